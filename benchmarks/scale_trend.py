"""The scale trend of each inversion (issue 24): for every pair of methods whose order at our sizes differs from
the papers', the gap at several sizes of one protocol, against the training steps, and where it would cross.

    python -m benchmarks.scale_trend --size cpu=runs/scale-cpu \
        --size medium=benchmarks/results/medium,benchmarks/results/pcp-nowarmup \
        --size large=runs/scale-large --out benchmarks/results/scale-trend

Each ``--size NAME=DIR[,DIR...]`` names ``benchmarks.run`` folders of one profile; a method in a later folder
replaces the same method of an earlier one (so PCP without its warm-up can come from a run of its own). PCP must
come from runs with ``--set warmup=false``: the PAD/PCP papers' order is that of PCP without the IS branch.
A pair's gap is "the papers' winner minus their loser" (negative: our order is inverted; PCP without its warm-up
is below IS in its own paper too, by 1.3), each seed against the
same seed (same initial network and images), mean ± std over the seeds both have. The trend is a least-squares
line of the mean gap on log10(steps); where the gap is negative and rising, the steps (and the images, at the
protocol's 50 epochs) where the line reaches 0 are given. That is a rough extrapolation of three points, and
labelled as one. Writes OUT/scale_trend.json, OUT/scale_trend.md and OUT/scale_trend.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.tables import mean_std, read_results, seed_gaps

# (the papers' winner, their loser, the papers' gap, where it is from)
PAIRS: tuple[tuple[str, str, float, str], ...] = (
    ("pad", "and", 6.7, "PAD paper Table 1, AlexNet CIFAR-10 kNN: 81.5 vs 74.8"),
    ("pad", "npid", 21.2, "PAD paper Table 1: 81.5 vs 60.3"),
    ("deepcluster", "npid", 2.0, "PAD paper Table 1: 62.3 vs 60.3 (the PCP paper's ResNet-18 rerun: 80.6 vs 80.8)"),
    ("uic", "deepcluster", 0.8, "UIC paper Table 3, ImageNet conv5 linear probe: 39.0 vs 38.2"),
    ("pcp", "is", -1.3, "PCP paper Tables IV-V, ResNet-18 kNN, round 0 without warm-up: 82.3 vs IS 83.6 "
                        "(with warm-up 84.7)"),
)
METRICS = ("knn_top1", "linear_top1")
EPOCHS_AT = 50  # the protocol's epochs at the medium and large sizes: images = steps * batch / epochs
PAPER_STEPS = math.ceil(50_000 / 128) * 200  # METHODS.md's CIFAR-10 length: 50,000 images, 200 epochs


def read_size(folders: list[str]) -> dict[str, Any]:
    """Methods (later folders win), the profile's train keys, and the --set pairs each method ran with."""
    methods: dict[str, dict[str, Any]] = {}
    train: dict[str, Any] = {}
    for folder in folders:
        summary, ok = read_results(folder)
        train = train or summary["profile_train"]
        methods.update({name: {**entry, "sets": summary.get("sets", [])} for name, entry in ok.items()})
    return {"methods": methods, "train": train, "folders": folders}


def training_steps(train: dict[str, Any]) -> int:
    """Optimiser steps of one method at this profile (every method of the trend has the same: AND's rounds
    split the same epochs)."""
    return math.ceil(train["subset"] / train["batch_size"]) * train["epochs"]


def pair_gap(size: dict[str, Any], winner: str, loser: str, metric: str) -> list[float] | None:
    methods = size["methods"]
    if winner not in methods or loser not in methods:
        return None
    return seed_gaps(methods[winner], methods[loser], metric)


def trend(points: list[tuple[int, float, float | None]], target: float = 0.0) -> dict[str, Any]:
    """From (steps, mean gap, its std; None for one seed) at each size: the least-squares slope of the mean gap on
    log10(steps), what the gap did from the smallest size to the largest against the two sizes' spreads (a
    one-seed size borrows the largest spread of the others), the line's value at the papers' CIFAR-10 length,
    and, for a gap that moved beyond the spreads towards ``target`` (0: the papers' order; or a pair's negative
    gap in the papers), where the line reaches it."""
    if len(points) < 2:
        return {"slope_per_decade": None, "verdict": "one size", "cross_steps": None, "cross_to": None,
                "at_paper_steps": None}
    xs, ys = [math.log10(p[0]) for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    known = [p[2] for p in points if p[2] is not None] or [0.0]
    (first, s_first), (last, s_last) = [(p[1], max(known) if p[2] is None else p[2]) for p in (points[0], points[-1])]
    if abs(last - first) <= s_first + s_last:
        verdict = "holds (within the spread)"
    elif last > first:
        verdict = "crosses to the papers' order" if first < 0 < last else "narrows" if last < 0 else \
            "widens in the papers' order"
    else:
        verdict = "inverts" if last < 0 < first else "widens" if first < 0 else "narrows, in the papers' order"
    heading = verdict.startswith("narrows") and ((last < target and slope > 0) or (slope < 0 and last > target))
    return {"slope_per_decade": slope, "verdict": verdict,
            "cross_steps": 10 ** (mx + (target - my) / slope) if heading else None,
            "cross_to": ("the papers' order" if last < target else "inverted") if heading else None,
            "at_paper_steps": my + slope * (math.log10(PAPER_STEPS) - mx)}


def analyse(sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for name, size in sizes.items():
        pcp = size["methods"].get("pcp")
        if pcp is not None and "warmup=false" not in pcp["sets"]:
            raise SystemExit(f"size {name}: PCP comes from a run without --set warmup=false ({size['folders']})")
    order = sorted(sizes, key=lambda n: training_steps(sizes[n]["train"]))
    rows = []
    for winner, loser, paper_gap, source in PAIRS:
        row: dict[str, Any] = {"pair": f"{winner} - {loser}", "paper_gap": paper_gap, "source": source, "sizes": {}}
        for metric in METRICS:
            points = []
            for name in order:
                gaps = pair_gap(sizes[name], winner, loser, metric)
                if not gaps:
                    continue
                m, s = mean_std(gaps)
                steps = training_steps(sizes[name]["train"])
                row["sizes"].setdefault(name, {"steps": steps, "images": sizes[name]["train"]["subset"],
                                               "epochs": sizes[name]["train"]["epochs"]})
                # one seed has no spread: 0 in the table's file, drawn with no error bar
                row["sizes"][name][metric] = {"mean": m, "std": s or 0.0, "seeds": len(gaps), "values": gaps}
                points.append((steps, m, s if len(gaps) > 1 else None))
            row[f"{metric}_trend"] = trend(points, min(0.0, paper_gap))
        rows.append(row)
    return {"sizes": {n: {"folders": sizes[n]["folders"], "steps": training_steps(sizes[n]["train"]),
                          "images": sizes[n]["train"]["subset"], "epochs": sizes[n]["train"]["epochs"]}
                      for n in order},
            "pairs": rows}


def fmt_gap(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    spread = f" ± {cell['std']:.2f}" if cell["seeds"] > 1 else " (1 seed)"
    return f"{cell['mean']:+.2f}{spread}"


def fmt_cross(t: dict[str, Any]) -> str:
    if t["cross_steps"] is None:
        return "-"
    steps = t["cross_steps"]
    if steps >= 1e9:
        return f"to {t['cross_to']} beyond 10^9 steps"
    return f"to {t['cross_to']} at ~{steps:,.0f} steps (~{steps * 128 / EPOCHS_AT:,.0f} images at 50 epochs)"


def markdown(result: dict[str, Any]) -> str:
    names = list(result["sizes"])
    head = " | ".join(f"{n} ({result['sizes'][n]['images'] // 1000}k / {result['sizes'][n]['epochs']} ep, "
                      f"{result['sizes'][n]['steps']:,} steps)" for n in names)
    lines = []
    for metric, title in (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1 (pooled)")):
        lines += [f"**{title} gap, the papers' winner minus their loser** (negative: inverted here; each seed "
                  "against the same seed, mean ± std)", "",
                  f"| pair | papers' gap | {head} | slope per decade of steps | trend | the line at "
                  f"{PAPER_STEPS:,} steps (extrapolation) | where the line reaches the papers' order: 0, or "
                  "their gap where it is negative (extrapolation) |",
                  "|---|---:|" + "---:|" * len(names) + "---:|---|---:|---|"]
        for row in result["pairs"]:
            t = row[f"{metric}_trend"]
            cells = " | ".join(fmt_gap(row["sizes"].get(n, {}).get(metric)) for n in names)
            slope = "-" if t["slope_per_decade"] is None else f"{t['slope_per_decade']:+.2f}"
            at_paper = "-" if t["at_paper_steps"] is None else f"{t['at_paper_steps']:+.1f}"
            lines.append(f"| {row['pair']} | {row['paper_gap']:+.1f} | {cells} | {slope} | {t['verdict']} | {at_paper} "
                         f"| {fmt_cross(t)} |")
        lines.append("")
    lines.append(f"A one-seed size's spread is the largest of the other sizes' for the trend verdict. "
                 f"{PAPER_STEPS:,} steps: METHODS.md's CIFAR-10 length (50,000 images, 200 epochs, batch 128), "
                 "but with our ConvNet; the papers' networks are ResNet-18 / AlexNet.")
    lines.append("")
    lines.append("Papers' gaps (the papers' numbers, their networks and lengths): "
                 + "; ".join(f"{r['pair']}: {r['source']}" for r in result["pairs"]) + ".")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (metric, title) in zip(axes, (("knn_top1", "kNN top-1 gap"), ("linear_top1", "linear top-1 gap")),
                                   strict=True):
        for row in result["pairs"]:
            cells = [(c["steps"], c[metric]) for c in row["sizes"].values() if metric in c]
            if not cells:
                continue
            xs = [s for s, _ in cells]
            ax.errorbar(xs, [c["mean"] for _, c in cells], yerr=[c["std"] for _, c in cells], marker="o",
                        capsize=3, label=row["pair"].replace(" - ", " − "))
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks([v["steps"] for v in result["sizes"].values()], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xticklabels([f"{n}\n{v['images'] // 1000}k / {v['epochs']} ep\n{v['steps']:,}"
                            for n, v in result["sizes"].items()], fontsize=8)
        ax.set_xlabel("training steps (batch 128)")
        ax.set_ylabel(f"{title} (points; < 0: inverted)")
        ax.set_title(title + ", papers' winner − loser")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_size(text: str) -> tuple[str, list[str]]:
    name, sep, folders = text.partition("=")
    if not sep or not folders:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR[,DIR...], got {text!r}")
    return name, folders.split(",")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_trend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, action="append", required=True, metavar="NAME=DIR[,DIR...]")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = analyse({name: read_size(folders) for name, folders in args.size})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_trend.json").write_text(json.dumps(result, indent=1))
    (out / "scale_trend.md").write_text(markdown(result))
    plot(result, out / "scale_trend.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
