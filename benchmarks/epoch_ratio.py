"""Epoch time of methods as a ratio of the supervised epoch, measured side by side in one process.

    python -m benchmarks.epoch_ratio --profile medium --methods pad,pcp [--epochs 3] [--first-epoch E]
                                     [--set key=value ...] [--init CHECKPOINT] --out DIR

Each method is set up as ``benchmarks.run`` would (the profile's keys, then its per-method overrides), then
the methods take turns: one training epoch each, round after round, so that a change in the machine's load
hits all of them alike. The ratio is the median over rounds of (method epoch / supervised epoch of the same
round), in process CPU time on one thread (wall time is also kept; it inflates with the machine's load);
"per view" divides by the method's augmented views (as the papers count IS's two-view epoch). The
method's own log (e.g. PAD's share of samples in an SCS, PCP's N_t) is kept per round: costs such as PAD's
second view depend on it. ``--init`` starts every backbone from a checkpoint (a trained network gives the
SCS shares and cluster counts of late training). Writes DIR/epoch_ratio.json and DIR/epoch_ratio.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from deepclust.config import resolve
from deepclust.train import run_epoch, setup

from .components import host_info
from .hostload import CpuWatch, busy_note
from .run import build_layers


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="medium")
    p.add_argument("--methods", required=True, help="comma-separated; supervised is always measured")
    p.add_argument("--epochs", type=int, default=3, help="measured rounds (one epoch of each method a round)")
    p.add_argument("--first-epoch", type=int, default=0,
                   help="the schedule's epoch of the first round (e.g. PCP's N_t and warm-up at that point)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--init", help="backbone weights for every method")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["supervised", *[m for m in args.methods.split(",") if m != "supervised"]]
    runs = {}
    for name in names:
        harness = argparse.Namespace(data=None, test_data=None, out=str(out), seed=None, epochs=None,
                                     max_epochs=None, set=args.set)
        layers, _, _ = build_layers(args.profile, name, harness)  # the profile's keys, as the harness applies them
        extra = {"eval_every": 0, **({"init": args.init} if args.init else {})}
        cfg, hp = resolve([*layers, extra])
        runs[name] = setup(cfg, hp)
    watch = CpuWatch()
    rounds: list[dict[str, Any]] = []
    for epoch in range(args.first_epoch, args.first_epoch + args.epochs):
        row: dict[str, Any] = {}
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            log = run_epoch(run, epoch)
            row[name] = {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "views": run.method.views,
                         **{k: v for k, v in log.items() if isinstance(v, (int, float)) and k not in ("time",)}}
        rounds.append(row)
        print(epoch, {n: (round(r["s"], 2), round(r["cpu_s"], 2)) for n, r in row.items()}, flush=True)
    result = {"date": datetime.date.today().isoformat(), "host": host_info(), "argv": args.__dict__,
              "other_cores": watch.other_cores(), "rounds": rounds, "methods": {}}
    for name in names:  # CPU time (one thread) is the cleaner figure when other jobs share the cores
        ratios = [r[name]["cpu_s"] / r["supervised"]["cpu_s"] for r in rounds]
        per_view = [x / r[name]["views"] for x, r in zip(ratios, rounds, strict=True)]
        result["methods"][name] = {"epoch_s": statistics.median(r[name]["s"] for r in rounds),
                                   "epoch_cpu_s": statistics.median(r[name]["cpu_s"] for r in rounds),
                                   "ratio": statistics.median(ratios), "ratio_per_view": statistics.median(per_view)}
    (out / "epoch_ratio.json").write_text(json.dumps(result, indent=1))
    lines = [f"{result['date']}, {result['host']}, profile {args.profile}, {args.epochs} rounds",
             busy_note(result["other_cores"]) or "machine quiet", "",
             "| method | median epoch s | median epoch CPU s | x supervised (CPU) | per view |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {m['epoch_s']:.2f} | {m['epoch_cpu_s']:.2f} | {m['ratio']:.2f} | {m['ratio_per_view']:.2f} |"
              for n, m in result["methods"].items()]
    (out / "epoch_ratio.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
