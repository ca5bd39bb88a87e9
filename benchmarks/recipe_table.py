"""Each method at the shared protocol and at its own paper's recipe, side by side (issue 24).

    python -m benchmarks.recipe_table --shared benchmarks/results/medium --own runs/own-medium \
        --out benchmarks/results/own-medium

``--shared`` and ``--own``: ``benchmarks.run`` folders of the same data and epochs (``--profile medium`` and
``--profile medium-own``). For every method in ``--own``: kNN top-1, linear top-1 and NMI (mean ± std over
seeds) in both, the own recipe minus the shared protocol seed by seed, and each run's kNN gain over its own
untrained network (a Sobel recipe starts from another network: its first layer sees 2 channels, not 3).
Writes OUT/recipe_table.md and OUT/recipe_table.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.tables import fmt_ms, mean_std, read_results, seed_gaps, seed_values

METRICS = (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"), ("nmi", "NMI"))


def compare(shared: dict[str, dict[str, Any]], own: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in own.items():
        if name not in shared:
            continue
        row: dict[str, Any] = {"method": name, "overrides": entry.get("overrides", {})}
        for metric, _ in METRICS:
            diffs = seed_gaps(entry, shared[name], metric)
            row[metric] = {"shared": mean_std(list(seed_values(shared[name], metric).values())),
                           "own": mean_std(list(seed_values(entry, metric).values())),
                           "diff": mean_std(diffs) if diffs else None, "seeds": len(diffs)}
        row["gain"] = {"shared": (shared[name].get("knn_gain"), shared[name].get("knn_gain_spread")),
                       "own": (entry.get("knn_gain"), entry.get("knn_gain_spread"))}
        rows.append(row)
    return rows


def gain(value: float | None, spread: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" + (" (1 seed)" if spread is None else f" ± {spread:.2f}")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | " + " | ".join(f"{t}: shared | own recipe | own − shared" for _, t in METRICS)
             + " | kNN vs untrained: shared | own |", "|---|" + "---:|---:|---:|" * len(METRICS) + "---:|---:|"]
    for row in rows:
        cells = []
        for metric, _ in METRICS:
            d, digits = row[metric], 3 if metric == "nmi" else 2
            cells += [fmt_ms(d["shared"], digits), fmt_ms(d["own"], digits), fmt_ms(d["diff"], digits, signed=True)]
        cells += [gain(*g) for g in row["gain"].values()]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipe_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", required=True)
    p.add_argument("--own", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = compare(read_results(args.shared)[1], read_results(args.own)[1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe_table.json").write_text(json.dumps(rows, indent=1))
    (out / "recipe_table.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
