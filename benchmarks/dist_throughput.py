"""Training throughput with 1, 2, ... data-parallel processes (issue 14): images per second of the epochs.

    python -m benchmarks.dist_throughput --procs 1,2 --method npid --data digits --epochs 3 --out DIR

Each process count trains the same method from scratch with ``deepclust train --nproc P`` (torchrun, gloo on
CPU, NCCL on GPU) and the same global batch; the figure is the training set's size over the median epoch time
of the epochs after the first (the trainer's ``time``: targets and steps, no kNN pass). On CPU each process
gets cores / P threads, so the comparison is of the same machine split two ways, not of more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from deepclust.checkpoint import load_checkpoint


def run(procs: int, args: argparse.Namespace, out: Path) -> dict:
    folder = out / f"p{procs}"
    threads = max(1, (os.cpu_count() or 1) // procs) if args.device == "cpu" else 1
    cmd = [sys.executable, "-m", "deepclust", "train", "--method", args.method, "--data", args.data,
           "--backbone", args.backbone, "--epochs", str(args.epochs), "--out", str(folder), "--device", args.device,
           f"batch_size={args.batch_size}", f"width={args.width}", "eval_every=0", "progress=false",
           f"threads={threads}", *args.set]
    if procs > 1:
        cmd[4:4] = ["--nproc", str(procs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "time" in r][1:] or [r["time"] for r in rows if "time" in r]
    n = load_checkpoint(folder / "checkpoint.pt")["num_samples"]
    median = statistics.median(times)
    return {"procs": procs, "threads_per_proc": threads, "epoch_s": median, "images_per_s": n / median,
            "epochs_timed": len(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2")
    p.add_argument("--method", default="npid")
    p.add_argument("--data", default="digits")
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(int(x), args, out) for x in args.procs.split(",")]
    base = results[0]["images_per_s"]
    for r in results:
        r["speedup"] = r["images_per_s"] / base
        print(f"{r['procs']} process(es) x {r['threads_per_proc']} thread(s): {r['images_per_s']:.0f} images/s "
              f"(epoch {r['epoch_s']:.2f} s), {r['speedup']:.2f}x")
    (out / "throughput.json").write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
