"""The papers' other evaluation protocols on the checkpoints of harness runs, one table per protocol family.

    python -m benchmarks.protocols DIR [DIR ...] --out OUT [--methods a,b] [--seeds 0,1]
                                   [--sections layers,fewshot,lowshot,probes] [--episodes 600]
                                   [--lowshot-draws 5] [--probe-epochs 32] [--layer-dim 2048] [--threads 1]

For every DIR/METHOD/seedS/checkpoint.pt (or DIR/METHOD/checkpoint.pt) that ``benchmarks.run`` wrote, on the
data its config.yaml names (data, test_data, subset, test_subset, subset_imbalance):

- ``layers``: linear probes (fast, L-BFGS) on every stage's pooled features (``eval --layers all``) and on
  the pooled last-stage features;
- ``fewshot``: UIC's Prototypical 5-way 1-shot and 5-shot episodes on the test images' eval feature;
- ``lowshot``: ODC's low-shot linear SVMs (mAP per shot value and their mean);
- ``probes`` (not in the default): the fast and the SGD linear probe side by side, each with its wall time.

Writes OUT/protocols.json and OUT/protocols.md (mean ± sample std over seeds, one row per method) and keeps
each checkpoint's numbers in OUT/units/METHOD_seedS.json, so a rerun only evaluates what is missing. The
harness folders are only read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from deepclust.eval.lowshot import LOWSHOT_SHOTS, fillable_shots

from .run import host_info, method_order
from .tables import fmt_pm, mean_std

SECTIONS = ("layers", "fewshot", "lowshot", "probes")
DEFAULT_SECTIONS = ("layers", "fewshot", "lowshot")

log = logging.getLogger("benchmarks")


def find_checkpoints(dirs: list[str], methods: set[str] | None, seeds: set[int] | None) -> list[tuple[str, Any, Path]]:
    """(method, seed or None, checkpoint) of every harness unit under ``dirs``, filtered."""
    found = []
    for root in map(Path, dirs):
        for ckpt in sorted(root.glob("*/seed*/checkpoint.pt")) + sorted(root.glob("*/checkpoint.pt")):
            seeded = ckpt.parent.name.startswith("seed") and ckpt.parent.name[4:].isdigit()
            method = ckpt.parent.parent.name if seeded else ckpt.parent.name
            seed = int(ckpt.parent.name[4:]) if seeded else None
            if (methods is None or method in methods) and (seeds is None or seed in seeds):
                found.append((method, seed, ckpt))
    return found


def evaluate_unit(ckpt: Path, sections: tuple[str, ...], args: argparse.Namespace, done: dict[str, Any],
                  data_cache: dict[tuple, Any]) -> dict[str, Any]:
    """The sections of one checkpoint that ``done`` lacks, with each section's wall time."""
    from deepclust.checkpoint import backbone_from_checkpoint, load_checkpoint
    from deepclust.config import read_yaml
    from deepclust.data import load_train_test
    from deepclust.eval import evaluate_backbone

    todo = [s for s in sections if f"{s}_wall_s" not in done]
    if not todo:
        return done
    cfg = read_yaml(ckpt.parent / "config.yaml")
    payload = load_checkpoint(ckpt)
    model = backbone_from_checkpoint(payload).to(args.device)
    size = payload["backbone"]["image_size"]
    key = (cfg["data"], cfg.get("test_data"), size, cfg.get("subset"), cfg.get("test_subset"),
           cfg.get("subset_imbalance"))
    if key not in data_cache:
        data_cache.clear()  # one dataset in memory at a time
        data_cache[key] = load_train_test(cfg["data"], cfg.get("test_data"), size, cfg.get("bad_images", "fail"),
                                          cfg.get("subset"), cfg.get("test_subset"), cfg.get("subset_imbalance"))
    train, test = data_cache[key]
    if test is None:
        raise ValueError(f"{ckpt}: no test data for {cfg['data']!r}")
    feature = payload["eval_feature"]
    out = dict(done, data=cfg["data"], test_data=test.name, train_images=len(train), test_images=len(test),
               eval_feature=feature)

    def timed(section: str, protocols: tuple[str, ...], **kw) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = evaluate_backbone(model, train, test, feature, protocols, args.device, seed=args.seed, **kw)
        result[f"{section}_wall_s"] = time.perf_counter() - t0
        return result

    if "layers" in todo:
        out.update(timed("layers", ("linear",), layers=("all",), layer_dim=args.layer_dim))
    if "fewshot" in todo:
        out.update(timed("fewshot", ("fewshot",), fewshot_shots=(1, 5), fewshot_episodes=args.episodes))
    if "lowshot" in todo:  # the shot values every class of the training data can fill
        out.update(timed("lowshot", ("lowshot",), lowshot_shots=fillable_shots(train.labels, LOWSHOT_SHOTS),
                         lowshot_draws=args.lowshot_draws))
    if "probes" in todo:
        fast = timed("fast_probe", ("linear",))
        sgd = timed("sgd_probe", ("linear",), probe="sgd", probe_epochs=args.probe_epochs)
        out.update(fast_probe_top1=fast["linear_top1"], fast_probe_wall_s=fast["fast_probe_wall_s"],
                   sgd_probe_top1=sgd["linear_top1"], sgd_probe_wall_s=sgd["sgd_probe_wall_s"],
                   probes_wall_s=fast["fast_probe_wall_s"] + sgd["sgd_probe_wall_s"])
    return out


def aggregate(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: every numeric key as mean and sample std over its seeds (a unit's own spreads, the
    draws' ``_std`` and the episodes' ``_ci95``, stay in its unit file)."""
    rows = []
    for method in method_order(list(dict.fromkeys(u["method"] for u in units))):
        mine = [u for u in units if u["method"] == method]
        row: dict[str, Any] = {"method": method, "seeds": [u["seed"] for u in mine]}
        for key in dict.fromkeys(k for u in mine for k, v in u.items() if isinstance(v, (int, float))
                                 and not isinstance(v, bool) and k != "seed" and not k.endswith(("_std", "_ci95"))):
            row[key], row[f"{key}_std"] = mean_std([u[key] for u in mine if u.get(key) is not None])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    columns = [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]
    if not columns:
        return []
    lines = ["| method | seeds | " + " | ".join(h for _, h in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['method']} | {len(r['seeds'])} | " + " | ".join(fmt_pm(r, k) for k, _ in columns) + " |")
    return lines + [""]


def markdown(summary: dict[str, Any]) -> str:
    rows, units = summary["methods"], summary["units"]
    first = units[0] if units else {}
    keys = list(dict.fromkeys(k for u in units for k in u))
    stages = [k for k in keys if k.startswith("linear_top1_")]
    lowshot = [k for k in keys if k.startswith("lowshot_map_") and not k.endswith("_std")]
    lines = [
        "# deepclust evaluation protocols on harness checkpoints", "",
        f"- runs: {', '.join(f'`{d}`' for d in summary['dirs'])}; data `{first.get('data')}` "
        f"({first.get('train_images')} train images), test `{first.get('test_data')}` "
        f"({first.get('test_images')} images)",
        f"- {summary['date']}, host: {summary['host']}; mean ± sample std over seeds; accuracy and mAP in %, "
        "times in seconds",
        f"- command: `{' '.join(summary['argv'])}`", "",
    ]
    layer_cols = [(k, k.removeprefix("linear_top1_")) for k in stages] + [("linear_top1", "pooled")]
    if stages:
        lines += ["Linear probes per stage (fast probe: L-BFGS on standardised features, each stage average-pooled "
                  f"to about {summary['layer_dim']} dimensions; `pooled` = the trunk's global average pool):", ""]
        lines += table(rows, layer_cols)
    shot_cols = [(k, k.removeprefix("fewshot_").replace("_", " ")) for k in keys
                 if k.startswith("fewshot_") and not k.endswith(("_ci95", "_wall_s"))]
    shot_cols += [(k, "SVM mAP " + k.removeprefix("lowshot_map_")) for k in lowshot]
    shot_cols += [("lowshot_map", "SVM mAP mean")]
    if any(r.get(k) is not None for r in rows for k, _ in shot_cols):
        lines += [f"Few-shot (UIC's Prototypical episodes on the test images, {summary['episodes']} per setting; "
                  "seed std, not the episodes' interval) and low-shot linear SVMs (ODC: n positives per class, "
                  f"{summary['lowshot_draws']} draws, mAP over classes; mean = over all n and draws):", ""]
        lines += table(rows, shot_cols)
    probe_cols = [("fast_probe_top1", "fast top-1"), ("fast_probe_wall_s", "fast s"),
                  ("sgd_probe_top1", "SGD top-1"), ("sgd_probe_wall_s", "SGD s")]
    if any(r.get("sgd_probe_top1") is not None for r in rows):
        lines += [f"Linear probe, fast (L-BFGS on cached pooled features) vs SGD ({summary['probe_epochs']} epochs "
                  "on random crops + flips through the frozen trunk); wall seconds include the feature passes:", ""]
        lines += table(rows, probe_cols)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.protocols", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="output folders of benchmarks.run")
    p.add_argument("--out", required=True, help="where protocols.md, protocols.json and units/ go")
    p.add_argument("--methods", help="comma-separated methods (default: every one found)")
    p.add_argument("--seeds", help="comma-separated seeds (default: every one found)")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    p.add_argument("--episodes", type=int, default=600, help="few-shot episodes per setting")
    p.add_argument("--lowshot-draws", type=int, default=5, help="low-shot SVM draws per shot value")
    p.add_argument("--probe-epochs", type=int, default=32, help="probes: epochs of the SGD probe")
    p.add_argument("--layer-dim", type=int, default=2048, help="layers: pooled dimensions per stage")
    p.add_argument("--seed", type=int, default=0, help="seed of the episode, SVM and SGD draws")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = build_parser()
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {m.strip() for m in args.methods.split(",")} if args.methods else None
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    found = find_checkpoints(args.dirs, methods, seeds)
    if not found:
        print(f"benchmarks.protocols: no METHOD/seedS/checkpoint.pt under {', '.join(args.dirs)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "units").mkdir(parents=True, exist_ok=True)
    units, data_cache = [], {}
    for i, (method, seed, ckpt) in enumerate(found, 1):
        path = out / "units" / (f"{method}_seed{seed}.json" if seed is not None else f"{method}.json")
        done = json.loads(path.read_text()) if path.is_file() else {}
        if done.get("checkpoint") != str(ckpt):
            done = {}
        result = evaluate_unit(ckpt, sections, args, done | {"method": method, "seed": seed,
                                                             "checkpoint": str(ckpt)}, data_cache)
        path.write_text(json.dumps(result, indent=1))
        units.append(result)
        log.info("[%d/%d] %s seed %s done", i, len(found), method, seed)
    summary = {"dirs": args.dirs, "argv": ["python", "-m", "benchmarks.protocols", *(argv or sys.argv[1:])],
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "host": host_info(args.threads), "sections": sections, "episodes": args.episodes,
               "lowshot_draws": args.lowshot_draws, "probe_epochs": args.probe_epochs, "layer_dim": args.layer_dim,
               "units": units, "methods": aggregate(units)}
    (out / "protocols.json").write_text(json.dumps(summary, indent=1))
    (out / "protocols.md").write_text(markdown(summary))
    print(f"wrote {out / 'protocols.md'} and {out / 'protocols.json'} ({len(units)} checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
