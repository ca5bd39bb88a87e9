"""VOC transfer (issue 33): the synthetic VOC-layout SVM mAP of trained backbones, and the projected time of the
papers' VOC07 detection recipe on one H200.

    OMP_NUM_THREADS=1 python -m benchmarks.voc_transfer svm --checkpoint NAME=FILE [NAME=FILE ...] --out DIR [--seed S]
    OMP_NUM_THREADS=1 python -m benchmarks.voc_transfer svm --runs RUNDIR [RUNDIR ...] --out DIR [--seed S]
    python -m benchmarks.voc_transfer table --out DIR
    OMP_NUM_THREADS=1 python -m benchmarks.voc_transfer project --out DIR

``svm``: writes a synthetic VOC layout (``deepclust.transfer.synthetic``: one shape a class, random colours; 6
classes, 300 trainval and 300 test images of 64 x 64 px, drawn with --seed) under DIR/voc-S and runs ``eval --protocol
voc-svm`` (ODC's VOC07 SVMs, cost by 3-fold CV) on each checkpoint at its own image size. It checks that the
protocol ranks backbones; it is not VOC. ``--runs`` takes every ``METHOD/seedS/checkpoint.pt`` of ``benchmarks.run``
folders, named ``METHOD/seedS``.

``table``: from every DIR/svm-*.json (one a layout), each method's mAP averaged over the layouts, as mean ± std
over its training seeds, and each seed minus the untrained network (``random``) of the same seed: the network
that seed's training started from.

``project``: one training step (forward and backward) of torchvision's Faster R-CNN R50-FPN as ``transfer
detection`` builds it (FrozenBN, the stem and layer1 frozen, 512 sampled RoIs an image) on one VOC-shaped image
(4:3, shorter side s, longer side 4s/3) at s = 480 and 800, counted with ``FlopCounterMode`` on the CPU, and one
test forward at 800 px with 1,000 proposals. The training FLOPs an image are interpolated in s^2 over the 11
sizes the recipe draws from; the recipe's total (18,000 iterations x 16 images, plus the 4,952 test images) is
divided by an assumed sustained throughput: NVIDIA's published H200 dense BF16 peak (989 TFLOPS) at MFU 5, 10,
20 and 30 % (detection training, with its NMS, RoI sampling and variable image sizes, sits far below peak). FLOPs are
counted at float32 as the CPU runs them; each is assumed at the BF16 rate (AMP).
A projection, not a measurement. Writes DIR/projection.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.tables import pm

H200_BF16_PEAK = 989e12  # NVIDIA's published H200 SXM dense BF16 tensor figure
MFUS = (0.05, 0.10, 0.20, 0.30)
RECIPE = "configs/transfer/voc07_detection_r50_fpn.yaml"
VOC07_TEST_IMAGES = 4952


def svm(args: argparse.Namespace) -> None:
    from deepclust.backbone_files import open_backbone
    from deepclust.commands.voc_svm import evaluate_voc_svm
    from deepclust.data import load_train_test
    from deepclust.transfer.synthetic import make_voc

    out = Path(args.out)
    root = out / f"voc-{args.seed}"
    if not (root / "VOCdevkit").is_dir():
        make_voc(root, sizes={"train": 200, "val": 100, "test": 300}, width=64, height=64, classes=6, seed=args.seed)
    written = out / f"svm-{args.seed}.json"
    # backbones evaluated in an earlier call on the same layout are kept (a name given again is replaced)
    results = json.loads(written.read_text())["results"] if written.is_file() else {}
    named = [item.partition("=")[::2] for item in args.checkpoint or []]
    for folder in args.runs or []:
        named += [(f"{c.parent.parent.name}/{c.parent.name}", str(c))
                  for c in sorted(Path(folder).glob("*/seed*/checkpoint.pt"))]
    if not named:
        raise SystemExit("voc_transfer svm: no checkpoint: give --checkpoint NAME=FILE or --runs DIR with METHOD/seedS")
    for name, path in named:
        opened = open_backbone(path)
        train, test = load_train_test(f"voc2007:{root}", None, opened.image_size)
        began = time.perf_counter()
        result = evaluate_voc_svm(opened.model, train, test, torch.device("cpu"))
        results[name] = {"checkpoint": path, "method": opened.method, "image_size": opened.image_size,
                         "voc_svm_map": result["voc_svm_map"], "voc_svm_ap": result["voc_svm_ap"],
                         "seconds": time.perf_counter() - began}
        print(f"| {name} | {path} | {result['voc_svm_map']:.2f} | "
              + " / ".join(f"{v:.1f}" for v in result["voc_svm_ap"].values()) + " |")
    out.mkdir(parents=True, exist_ok=True)
    written.write_text(json.dumps({
        "data": f"synthetic VOC layout: 6 classes, 300 trainval, 300 test, 64x64 px, seed {args.seed}",
        "results": results}, indent=1))


def table(args: argparse.Namespace) -> None:
    out = Path(args.out)
    layouts = {int(f.stem.split("-")[1]): json.loads(f.read_text())["results"] for f in sorted(out.glob("svm-*.json"))}
    if not layouts:
        raise SystemExit(f"voc_transfer table: no svm-*.json in {out}: run `svm --out {out}` first")
    # {method: {training seed: {layout: mAP}}}
    maps: dict[str, dict[str, dict[int, float]]] = {}
    for layout, results in layouts.items():
        for name, r in results.items():
            method, _, seed = name.partition("/")
            maps.setdefault(method, {}).setdefault(seed, {})[layout] = r["voc_svm_map"]
    order = sorted(layouts)
    # each training seed's mAP averaged over the layouts, for the seeds scored on every layout
    means = {m: {s: sum(v.values()) / len(v) for s, v in seeds.items() if len(v) == len(order)}
             for m, seeds in maps.items()}
    untrained = means.get("random", {})
    lines = ["| backbone | training seeds | mAP, layout " + " / ".join(map(str, order)) + " (mean over seeds) "
             "| mAP, mean over layouts | minus the untrained network of the same seed |", "|---|---|---|---|---|"]
    rows = {}
    for method, seeds in maps.items():
        mean = means[method]
        gaps = [mean[s] - untrained[s] for s in sorted(mean) if method != "random" and s in untrained]
        per_layout = " / ".join(pm([v[L] for v in seeds.values() if L in v]) for L in order)
        rows[method] = {"seeds": sorted(mean), "map": [mean[s] for s in sorted(mean)], "minus_untrained": gaps}
        lines.append(f"| {method} | {len(mean)} | {per_layout} | {pm(list(mean.values()))} | "
                     + (pm(gaps, signed=True) if gaps else "-") + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({"layouts": order, "methods": rows}, indent=1))


def count(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict] | None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        if targets is None:
            with torch.no_grad():
                model(images)
        else:
            loss = sum(model(images, targets).values())
            loss.backward()
    return float(counter.get_total_flops())


def project(args: argparse.Namespace) -> None:
    from deepclust.backbones import Backbone
    from deepclust.config import read_yaml
    from deepclust.transfer.config import resolve_transfer
    from deepclust.transfer.models import detection_model

    cfg = resolve_transfer([read_yaml(Path(RECIPE)), {"checkpoint": "-", "data": "voc2007:-"}])
    torch.manual_seed(0)
    backbone = Backbone("resnet50", 224)  # random weights: the FLOPs do not depend on them
    model = detection_model(backbone, cfg)
    model.train()

    def image(short: int) -> tuple[torch.Tensor, dict]:
        long = short * 4 // 3
        boxes = torch.tensor([[0.1 * long, 0.1 * short, 0.5 * long, 0.6 * short],
                              [0.4 * long, 0.3 * short, 0.9 * long, 0.9 * short]])
        return torch.rand(3, short, long), {"boxes": boxes, "labels": torch.tensor([1, 15])}

    train = {}
    for short in (480, 800):
        model.transform.min_size = (short,)
        x, t = image(short)
        began = time.perf_counter()
        train[short] = count(model, [x], [t])
        print(f"train step, 1 image at {short}x{short * 4 // 3}: {train[short] / 1e9:.1f} GFLOP "
              f"({time.perf_counter() - began:.1f} s on the CPU)")
    model.eval()
    model.transform.min_size = (cfg.test_min_size,)
    test = count(model, [image(800)[0]], None)
    print(f"test forward at 800x1066, {cfg.test_proposals} proposals: {test / 1e9:.1f} GFLOP")
    slope = (train[800] - train[480]) / (800 ** 2 - 480 ** 2)
    per_image = sum(train[480] + slope * (s ** 2 - 480 ** 2) for s in cfg.min_size) / len(cfg.min_size)
    total = cfg.iterations * cfg.batch_size * per_image + VOC07_TEST_IMAGES * test
    rows = {f"{int(100 * m)}%": total / (H200_BF16_PEAK * m) / 3600 for m in MFUS}
    print("\n| recipe | train FLOPs an image (mean over sizes) | total FLOPs | hours on one H200 at MFU "
          + " / ".join(rows) + " |\n|---|---|---|---|")
    print(f"| {RECIPE} ({cfg.iterations} it x {cfg.batch_size} img) | {per_image / 1e9:.0f} GFLOP | "
          f"{total / 1e15:.0f} PFLOP | " + " / ".join(f"{h:.2f}" for h in rows.values()) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "projection.json").write_text(json.dumps({
        "recipe": RECIPE, "train_step_flops_per_image": {str(k): v for k, v in train.items()},
        "train_flops_per_image_mean": per_image, "test_forward_flops_per_image": test,
        "iterations": cfg.iterations, "batch_size": cfg.batch_size, "test_images": VOC07_TEST_IMAGES,
        "total_flops": total, "assumed_peak_flops": H200_BF16_PEAK, "hours_at_mfu": rows,
        "kind": "projection from CPU FLOP counts, not a measurement"}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("svm", help="voc-svm mAP of checkpoints on a synthetic VOC layout")
    s.add_argument("--checkpoint", nargs="+", help="NAME=FILE, a backbone file each")
    s.add_argument("--runs", nargs="+", help="benchmarks.run folders: each METHOD/seedS/checkpoint.pt, as METHOD/seedS")
    s.add_argument("--out", required=True, help="folder for the synthetic VOC and svm-SEED.json")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic VOC layout")
    t = sub.add_parser("table", help="mean ± std over training seeds of the svm-*.json in --out")
    t.add_argument("--out", required=True, help="the folder svm wrote its svm-SEED.json into")
    p = sub.add_parser("project", help="projected H200 time of the VOC07 detection recipe")
    p.add_argument("--out", required=True, help="folder for projection.json")
    args = parser.parse_args()
    {"svm": svm, "table": table, "project": project}[args.what](args)


if __name__ == "__main__":
    main()
