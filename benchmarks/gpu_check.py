"""The first run on a GPU machine, prepared to fit one short session: tests, then every method's paper recipe.

    python -m benchmarks.gpu_check pack [--root ../shared/datasets/cifar10] [--out .cache/gpu-check/cifar10.npz]
    benchmarks/gpu_check.sh [--device cuda|cpu] [--smoke] [--data .cache/gpu-check/cifar10.npz] --out DIR

``pack`` (here, where ../shared exists) stores CIFAR-10's 60,000 JPEG files as they are, byte for byte, in one
.npz of about 53 MiB in an ignored folder, so that the GPU machine needs nothing outside the repository (its
carry limit is 64 MiB). ``run`` then, within ``--budget`` seconds (8 minutes: the data, the tests, every job and
the compilation included; each job capped, and what ran is written after every job):

1. decodes them (the same PIL decode as ``deepclust train --data DIR``) into a plain .npz in a work folder outside
   ``--out`` (``--work``, a temporary one by default: only the reports come back from a GPU machine);
2. runs the device-parametrised tests on the device (``tests/test_device.py``; its training tests set
   DEEPCLUST_SYNC_DEBUG=error themselves, so any host-device sync in a training step fails them);
3. trains every method on the paper recipe (ResNet-18-CIFAR, the 50,000 training images, batch 128, the shared
   protocol's optimiser) for 2 epochs (AND: one NPID round and one anchor round of an epoch each), NPID and PCP
   for 3 with the kNN (k = 200, the 10,000 test images) after each; with DEEPCLUST_SYNC_DEBUG=warn the syncs the
   step loop still makes are counted. Per method: images/s over its last epoch's steps, GPU peak memory, the
   epoch-target time (k-means, kNN graph, SCS, feature passes) per epoch, the last loss and kNN;
4. times NPID at batch 512 (lr scaled x4) and with ``compile=true`` (its first epoch holds the compilation),
   to say what the recipe could reach, and counts the kernels one NPID step launches, augmentation eager and
   compiled (``kernels_per_step``).

It writes OUT/gpu_check.json and OUT/gpu_check.md (a table BENCHMARKS.md can take as it is), nothing else.
``--smoke`` runs the same steps on 32 images (2 steps of 16) for 1 epoch (``--device cpu --smoke`` checks the script
end to end on a CPU in a few minutes, before any GPU time is spent on it).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PACK = REPO / ".cache" / "gpu-check" / "cifar10.npz"
METHODS = ("supervised", "npid", "is", "and", "pcp", "pad", "deepcluster", "odc", "uic")
LATER_METHODS = ("swav", "deepclusterv2", "sela")  # issue 30's: after the kernel counts, as the budget allows
KNN_EACH_EPOCH = ("npid", "pcp")


def pack(root: Path, out: Path) -> None:
    """CIFAR-10's JPEG files, byte for byte, with their labels: ``{split}_jpeg`` (all bytes), ``{split}_offsets``."""
    from deepclust.data import list_image_folder

    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        files, labels, classes = list_image_folder(root / split)
        blobs = [f.read_bytes() for f in files]
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0, *map(len, blobs)]).astype(np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    arrays["classes"] = np.array(classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"wrote {out}: {out.stat().st_size / 2**20:.1f} MiB")


def decode(packed: Path, out_dir: Path, limit: int | None) -> tuple[str, str]:
    """The packed JPEGs decoded to RGB uint8 (PIL, as deepclust's folder loader) in train.npz and test.npz."""
    from PIL import Image

    paths = []
    with np.load(packed, allow_pickle=False) as z:
        for split in ("train", "test"):
            jpeg, offsets, labels = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_labels"]
            n = len(labels) if limit is None else min(limit if split == "train" else limit // 2, len(labels))
            pick = np.linspace(0, len(labels) - 1, n).astype(np.int64)  # every class, when limited
            images = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes()))
                                          .convert("RGB")) for i in pick])
            path = out_dir / f"{split}.npz"
            np.savez(path, images=images, labels=labels[pick])
            paths.append(str(path))
    return paths[0], paths[1]


def device_info(device: torch.device) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc)  # not datetime.UTC: Python 3.11 and newer only
    info = {"torch": torch.__version__, "device": str(device), "date": now.isoformat(timespec="seconds")}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        info.update(name=torch.cuda.get_device_name(device), capability=".".join(map(str, torch.cuda.
                    get_device_capability(device))), memory_gib=round(total / 2**30, 1),
                    free_gib=round(free / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(name=f"CPU, {os.cpu_count()} cores")
    return info


def run_tests(cap: float) -> dict[str, Any]:
    """The device-parametrised tests. Their training tests set DEEPCLUST_SYNC_DEBUG=error themselves: set for the
    whole process it would also fail the fixtures that train on ``auto`` outside any step loop check."""
    env = {k: v for k, v in os.environ.items() if k != "DEEPCLUST_SYNC_DEBUG"}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "4")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests/test_device.py"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=cap)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, code = f"{err.stdout or ''}\ntimed out after {cap:.0f} s", "timeout"
    tail = output.strip().splitlines()[-15:]
    print("\n".join(tail))
    return {"command": " ".join(cmd[2:]), "returncode": code, "seconds": round(time.perf_counter() - t0, 1),
            "summary": tail[-1] if tail else ""}


@contextmanager
def time_cap(seconds: float):
    """A training job asked to stop after its current step once ``seconds`` have passed (as SIGTERM would: the
    epochs it finished are in its metrics), so that one slow job cannot spend the others' time."""
    from deepclust.safety import STOP

    def expire(signum, frame):
        STOP.signum = signal.SIGTERM

    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def recipe(method: str, data: tuple[str, str], out: Path, device: torch.device, smoke: bool,
           **keys: Any) -> dict[str, Any]:
    """The paper profile's keys for ``method``, at this script's length and on ``data``."""
    layer = {k: v for k, v in PROFILES["paper"]["train"].items() if k not in ("data", "test_data")}
    layer.update({k: v for k, v in PROFILES["paper"]["methods"].get(method, {}).items() if k != "rounds"})
    epochs = 1 if smoke else (3 if method in KNN_EACH_EPOCH else 2)
    layer.update(method=method, data=data[0], test_data=data[1], out=str(out), device=str(device), epochs=epochs,
                 eval_every=1 if method in KNN_EACH_EPOCH else 0, progress=False)
    if method == "and":  # round 0 is NPID, round 1 the first anchor round: one epoch each
        layer.update(rounds=2, epochs=1)
    if smoke:  # 32 images, 2 steps: the paper's k = 1000 would exceed them (k = None: N / 50, at least 2)
        layer["batch_size"] = 16
        if "k" in layer:
            layer["k"] = None
    layer.update(keys)
    return layer


def train_one(layer: dict[str, Any], device: torch.device, cap: float) -> dict[str, Any]:
    """Train one configuration for at most ``cap`` seconds; its step rate, peak memory, target time and the syncs
    counted by torch."""
    from deepclust.config import resolve
    from deepclust.epoch import batch_bounds
    from deepclust.safety import RunInterrupted
    from deepclust.train import read_metrics, train

    cfg, hp = resolve([layer])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    os.environ["DEEPCLUST_SYNC_DEBUG"] = "warn"
    t0 = time.perf_counter()
    capped = False
    try:
        with warnings.catch_warnings(record=True) as caught, time_cap(cap):
            warnings.simplefilter("always")
            train(cfg, hp, overwrite=True)  # a rerun into the same --out keeps the old run beside, as DIR.1
    except RunInterrupted:
        capped = True
    finally:  # a failed job must not leave the next one in warn mode
        os.environ.pop("DEEPCLUST_SYNC_DEBUG")
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(Path(cfg.out) / "metrics.jsonl") if not r.get("untrained") and "loss" in r]
    if not rows:
        raise TimeoutError(f"stopped by its {cap:.0f} s cap before its first epoch ended")
    untrained = next((r["knn_top1"] for r in read_metrics(Path(cfg.out) / "metrics.jsonl") if r.get("untrained")),
                     None)
    last = rows[-1]
    with np.load(cfg.data) as z:
        steps = len(batch_bounds(len(z["labels"]), cfg.batch_size))
    step_time = last["time"] - last["targets_time"]
    syncs = sum("synchronizing" in str(w.message) for w in caught)
    parts = {k: round(rows[-1][k], 2) for k in ("cluster_time", "graph_time", "scs_time") if k in rows[-1]}
    return {"method": cfg.method, "batch": cfg.batch_size, "compile": cfg.compile, "epochs": len(rows),
            "images_per_s": round(steps * cfg.batch_size / step_time, 1),
            "epoch_s": round(last["time"], 2), "targets_s": [round(r["targets_time"], 2) for r in rows],
            "target_parts_last_s": parts,  # clustering (features, PCA, k-means), PAD's kNN graph and SCS
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "syncs": syncs, "loss": round(last["loss"], 4),
            "knn": [r.get("knn_top1") for r in rows], "knn_untrained": untrained,
            "first_epoch_s": round(rows[0]["time"], 2), "wall_s": round(wall, 1), "capped": capped}


def parts(r: dict[str, Any]) -> str:
    names = {"cluster_time": "clustering", "graph_time": "kNN graph", "scs_time": "SCS"}
    found = r.get("target_parts_last_s") or {}
    return f" (last: {', '.join(f'{names[k]} {v:.2f}' for k, v in found.items())})" if found else ""


def table(results: list[dict[str, Any]]) -> str:
    head = ("| method | batch | compile | images/s (last epoch) | epoch s | epoch targets s | peak GiB | syncs in the "
            "step loop | last loss | kNN per epoch (untrained) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in results:
        knn = ", ".join(f"{k:.2f}" for k in r["knn"] if k is not None) or "-"
        untrained = "" if r["knn_untrained"] is None else f" ({r['knn_untrained']:.2f})"
        name = f"{r['method']} (capped)" if r.get("capped") else r["method"]
        lines.append(f"| {name} | {r['batch']} | {'yes' if r['compile'] else 'no'} | {r['images_per_s']:.0f} | "
                     f"{r['epoch_s']:.1f} | {' / '.join(f'{t:.2f}' for t in r['targets_s'])}{parts(r)} | "
                     f"{'-' if r['peak_gib'] is None else r['peak_gib']} | {r['syncs']} | {r['loss']:.3f} | "
                     f"{knn}{untrained} |")
    return head + "\n".join(lines) + "\n"


def kernels_per_step(device: torch.device, compiled: bool) -> dict[str, Any]:
    """CUDA kernels one NPID training step launches (ResNet-18-CIFAR, batch 128, 32 px; the augmentation eager or
    compiled as ``compile=true`` compiles it), counted by the profiler over the third step (the first two warm up
    and compile)."""
    from deepclust.augment import Augment
    from deepclust.backbones import Backbone
    from deepclust.epoch import make_batch
    from deepclust.methods import METHODS

    n, batch = 4096, 128
    method = METHODS["npid"](Backbone("resnet18_cifar", 32), n).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    augment, gen = Augment(32, compiled=compiled), torch.Generator(device=device).manual_seed(0)

    def step(start: int) -> None:
        index = torch.arange(start, start + batch, device=device)
        b = make_batch(method, augment, images[index], index, None, batch, slice(0, batch), gen, True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, outputs = method(b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(b, outputs)

    step(0), step(batch)
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(2 * batch)
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"compiled_augmentation": compiled, "kernels": len(kernels),
            "kernel_ms": round(sum(e.device_time for e in kernels) / 1e3, 3)}


def run(args: argparse.Namespace) -> None:
    """Each job in order of what the first GPU run most needs to know, each within its cap and all within the
    budget; the reports are rewritten after every job, so a run stopped from outside keeps what it had."""
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))  # data and runs: never under --out
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def left() -> float:
        return args.budget - (time.perf_counter() - t0)

    report: dict[str, Any] = {"info": device_info(device), "smoke": args.smoke, "budget_s": args.budget,
                              "work": str(work), "tests": {"summary": "not run", "seconds": 0}, "decode_s": None}
    print(report["info"])
    if not Path(args.data).is_file():
        sys.exit(f"no packed data {args.data}: run `python -m benchmarks.gpu_check pack` where ../shared exists")
    data = decode(Path(args.data), work, 32 if args.smoke else None)  # smoke: 2 steps an epoch at batch 16
    report["decode_s"] = round(time.perf_counter() - t0, 1)
    report["tests"] = run_tests(min(args.tests_cap, max(10.0, left() - 60)))
    report["results"] = results = []
    report["failed"] = failed = []
    report["kernels"] = kernels = []
    write_report(report, args, time.perf_counter() - t0)
    jobs: list[tuple[str, Any]] = [(m, recipe(m, data, work / "runs" / m, device, args.smoke)) for m in METHODS]
    for name, keys in (("batch512", {"batch_size": 512, "lr": 0.12}), ("compiled", {"compile": True})):
        if args.smoke and device.type == "cpu" and name == "compiled":
            continue  # compiling on a CPU takes minutes: the GPU run times it
        keys = {**keys, "batch_size": 32 if args.smoke else keys.get("batch_size", 128)}
        jobs.append((f"npid-{name}", recipe("npid", data, work / "runs" / f"npid-{name}", device, args.smoke,
                                            **keys, eval_every=0, epochs=1 if args.smoke else 2)))
    if device.type == "cuda":
        jobs += [(f"kernels-{'compiled' if c else 'eager'}", c) for c in (False, True)]
    jobs += [(m, recipe(m, data, work / "runs" / m, device, args.smoke)) for m in LATER_METHODS]
    for name, job in jobs:
        cap = min(args.job_cap, left() - 5)
        if cap < 15:  # too little left to learn anything: say so rather than overrun the session
            failed.append({"job": name, "error": f"skipped: {max(0.0, left()):.0f} s of the budget left"})
            continue
        try:
            if name.startswith("kernels-"):
                kernels.append(kernels_per_step(device, job))
            else:
                results.append(train_one(job, device, cap))
            print((kernels if name.startswith("kernels-") else results)[-1], flush=True)
        except Exception as err:  # one failure must not cost the rest of a short GPU session
            failed.append({"job": name, "error": f"{type(err).__name__}: {err}"[:2000]})
            print(f"FAILED {name}: {failed[-1]['error']}", flush=True)
        write_report(report, args, time.perf_counter() - t0)  # after every job: a timeout keeps what ran
    write_report(report, args, time.perf_counter() - t0)
    print((out / "gpu_check.md").read_text())


def write_report(report: dict[str, Any], args: argparse.Namespace, elapsed: float) -> None:
    out = Path(args.out)
    report["total_s"] = round(elapsed, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    info = report["info"]
    md = (f"`benchmarks/gpu_check.sh --device {args.device}{' --smoke' if args.smoke else ''} --out {args.out}`, "
          f"{info['date']}, {info['name']}, torch {info['torch']}: tests `{report['tests']['summary']}` "
          f"({report['tests']['seconds']} s), decode {report['decode_s']} s, all {report['total_s']} s.\n\n"
          + table(report.get("results", []))
          + "".join(f"\nKernels a NPID step launches, augmentation "
                    f"{'compiled' if k['compiled_augmentation'] else 'eager'}: {k['kernels']} ({k['kernel_ms']} ms on "
                    "the device)\n" for k in report.get("kernels", []))
          + "".join(f"\n**failed** {f['job']}: `{f['error'][:300]}`\n" for f in report.get("failed", [])))
    (out / "gpu_check.md").write_text(md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("pack", help="store CIFAR-10's JPEG files in one .npz (run where ../shared exists)")
    k.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "cifar10"),
                   help="CIFAR-10 as an ImageFolder of JPEGs (train/, test/)")
    k.add_argument("--out", default=str(DEFAULT_PACK), help="the .npz to write")
    r = sub.add_parser("run", help="tests and the paper recipe of every method on this device")
    r.add_argument("--device", default="cuda", help="cuda, or cpu for the end-to-end smoke check")
    r.add_argument("--smoke", action="store_true", help="32 images, 2 steps, 1 epoch: checks the script end to end")
    r.add_argument("--data", default=str(DEFAULT_PACK), help="the packed CIFAR-10 of `pack`")
    r.add_argument("--out", required=True, help="where gpu_check.json and gpu_check.md go (nothing else)")
    r.add_argument("--work", default=None, help="decoded data and runs (default: a new temporary folder)")
    r.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check, data and tests included")
    r.add_argument("--job-cap", type=float, default=75.0, help="seconds at most for one training job")
    r.add_argument("--tests-cap", type=float, default=120.0, help="seconds at most for the device tests")
    args = p.parse_args(argv)
    if args.command == "pack":
        pack(Path(args.root), Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
