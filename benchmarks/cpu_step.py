"""Which CPU settings make a training step faster: the trainer's step against bf16 autocast, torch.compile,
a larger batch and the thread count, measured side by side (interleaved rounds) in one process.

    python -m benchmarks.cpu_step [--backbone convnet] [--width 32] [--rounds 5] [--steps 10] --out DIR

Each variant is a full step (augmented-size input, forward, cross-entropy, backward, SGD) of the real
backbone; images/s is the median over rounds, and every round runs every variant once so that a change
in the machine's load hits all of them alike. Writes DIR/cpu_step.json and DIR/cpu_step.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .components import host_info
from .hostload import CpuWatch, busy_note


def make_step(backbone: str, width: int, batch: int, channels_last: bool, bf16: bool,
              compile_model: bool) -> Callable[[], float]:
    from deepclust.backbones import Backbone

    torch.manual_seed(0)
    model = Backbone(backbone, 32, 128, False, width)
    head = torch.nn.Linear(model.feat_dim, 10)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.03, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    features = torch.compile(model.features) if compile_model else model.features
    model.train()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(head(features(x)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return step


VARIANTS: dict[str, dict[str, Any]] = {
    "trainer (fp32, channels_last, batch 128)": {"batch": 128, "channels_last": True, "bf16": False,
                                                 "compile_model": False},
    "fp32, contiguous": {"batch": 128, "channels_last": False, "bf16": False, "compile_model": False},
    "bf16 autocast, channels_last": {"batch": 128, "channels_last": True, "bf16": True, "compile_model": False},
    "torch.compile, channels_last": {"batch": 128, "channels_last": True, "bf16": False, "compile_model": True},
    "batch 256, channels_last": {"batch": 256, "channels_last": True, "bf16": False, "compile_model": False},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each variant in each round")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to compare")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    watch = CpuWatch()
    rows: list[dict[str, Any]] = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        steps = {name: make_step(args.backbone, args.width, **v) for name, v in VARIANTS.items()}
        for step in steps.values():  # warm-up (and compilation) outside the timing
            step(), step()
        rates: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                rates[name].append(VARIANTS[name]["batch"] * args.steps / (time.perf_counter() - t0))
        for name, values in rates.items():
            rows.append({"threads": threads, "variant": name, "images_per_s": statistics.median(values),
                         "rounds": values})
    base = {r["threads"]: r["images_per_s"] for r in rows if r["variant"].startswith("trainer")}
    for r in rows:
        r["vs_trainer"] = r["images_per_s"] / base[r["threads"]]
    report = {"date": datetime.date.today().isoformat(), "host": host_info(), "backbone": args.backbone,
              "width": args.width, "other_cores": watch.other_cores(), "rows": rows}
    (out / "cpu_step.json").write_text(json.dumps(report, indent=1))
    lines = [f"# CPU training step, {args.backbone}" + (f" width {args.width}" if args.backbone == "convnet" else ""),
             "", f"{report['date']}, {report['host']}; median of {args.rounds} interleaved rounds of {args.steps} "
             "steps", ""]
    busy = busy_note(report["other_cores"])
    if busy:
        lines += [f"**{busy}**", ""]
    lines += ["| threads | variant | images/s | vs the trainer's step |", "|---:|---|---:|---:|"]
    lines += [f"| {r['threads']} | {r['variant']} | {r['images_per_s']:.0f} | {r['vs_trainer']:.2f} |" for r in rows]
    (out / "cpu_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
