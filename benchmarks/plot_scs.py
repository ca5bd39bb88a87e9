"""PAD's SCS dynamics over epochs (the paper's Fig. 4): precision, mean size and share of samples in an SCS,
from every ``metrics.jsonl`` under DIR that logs them (a benchmark output folder, or one run's OUT).

    python -m benchmarks.plot_scs DIR [--out DIR/scs_curves.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = (("scs_precision", "precision (same-class fellow members)"), ("scs_mean_size", "mean SCS size"),
          ("scs_share", "share of samples in an SCS"))


def scs_curves(root: Path) -> dict[str, list[dict]]:
    """Rows with SCS statistics of each run under ``root``, keyed by the run's folder relative to ``root``."""
    runs = {}
    for path in sorted(root.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "scs_share" in r]
        if rows:
            runs[str(path.parent.relative_to(root)) or "."] = rows
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot_scs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    runs = scs_curves(args.root)
    if not runs:
        print(f"no metrics.jsonl with SCS statistics under {args.root}", file=sys.stderr)
        return 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, rows in runs.items():
        epochs = [r["global_epoch"] + 1 for r in rows]
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            if all(key in r for r in rows):
                ax.plot(epochs, [r[key] for r in rows], marker="o", markersize=3, label=name)
    for ax, (_, label) in zip(axes, PANELS, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = args.out or args.root / "scs_curves.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
