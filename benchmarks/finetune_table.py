"""The fine-tuning table (the ODC paper's Table 4 protocol): methods started from one trained network, against
that network and against the same network trained as long again by its own method (the control).

    python -m benchmarks.finetune_table --start runs/ft-base --runs runs/finetune-s0 runs/finetune-s12 \
        [--control is] --out benchmarks/results/finetune

``--start``: the ``benchmarks.run`` folder of the starting networks (one per seed); ``--runs``: the folders of
the fine-tuning runs (``--profile finetune --set init=START/is/seed{seed}/checkpoint.pt``). For each method:
kNN top-1, linear top-1 and NMI (mean ± std over seeds), and each seed's difference to the control and to the
start of the same seed (mean ± std of the differences): a clustering stage adds something when its difference
to the control is positive and larger than its spread. Writes OUT/finetune.json and OUT/finetune.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.tables import mean_std, pm

QUALITY = ("knn_top1", "knn_pooled", "linear_top1", "nmi")
NAMES = {"knn_top1": "kNN top-1 (own feature)", "knn_pooled": "kNN top-1 (pooled)", "linear_top1": "linear top-1",
         "nmi": "NMI"}


def pooled_knn(checkpoint: Path, config: dict[str, Any], data: dict[str, Any]) -> float:
    """Weighted kNN (the run's k and tau) on the pooled features of the run's training and test images: one
    feature for every method, since a method that trains the pooled features leaves the start's embedding
    head behind (DeepCluster, ODC, UIC evaluate pooled; IS and the bank methods their embedding)."""
    import torch

    from deepclust.checkpoint import backbone_from_checkpoint, load_checkpoint
    from deepclust.data import load_train_test
    from deepclust.eval import extract_features, knn_accuracy

    key = (config["data"], config["test_data"], config["subset"], config["test_subset"])
    if key not in data:
        data[key] = load_train_test(config["data"], config["test_data"], None, "fail", config["subset"],
                                    config["test_subset"])
    train, test = data[key]
    model = backbone_from_checkpoint(load_checkpoint(checkpoint))
    feats = [extract_features(model, d.images, "pooled", device=torch.device("cpu")) for d in (train, test)]
    return knn_accuracy(feats[1], test.labels, feats[0], train.labels, config["knn_k"], config["knn_tau"])


def per_seed(folders: list[str], data: dict[str, Any]) -> dict[str, dict[int, dict[str, float]]]:
    """{method: {seed: {quality key: value}}} from every ok run of the folders' results.json, with the kNN on
    pooled features of each run's final checkpoint."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for folder in folders:
        for run in json.loads((Path(folder) / "results.json").read_text())["runs"]:
            if run.get("status") == "ok":
                row = {k: run[k] for k in QUALITY if k in run}
                ckpt = Path(folder) / run["method"] / f"seed{run['seed']}" / "checkpoint.pt"
                row["knn_pooled"] = pooled_knn(ckpt, run["config"], data)
                out.setdefault(run["method"], {})[run["seed"]] = row
    return out


def paired(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], key: str) -> list[float]:
    return [a[s][key] - b[s][key] for s in sorted(a) if s in b and key in a[s] and key in b[s]]


def verdict(diffs: list[float]) -> str:
    m, s = mean_std(diffs)
    if m is None or s is None:
        return "one seed"
    if abs(m) <= s:
        return "within the spread"
    return "adds" if m > 0 else "loses"


def table(start: dict[int, dict[str, float]], runs: dict[str, dict[int, dict[str, float]]], control: str,
          start_name: str) -> tuple[str, list[dict[str, Any]]]:
    rows, lines = [], []
    head = (f"| method (from {start_name}) | seeds | " + " | ".join(NAMES[k] for k in QUALITY) + " | "
            + " | ".join(f"{NAMES[k]} vs control, paired" for k in QUALITY)
            + " | kNN (pooled) vs start, paired |\n|---|---:|" + "---:|" * (2 * len(QUALITY) + 1) + "\n")
    lines.append(f"| {start_name} (the start) | {len(start)} | " + " | ".join(
        pm([v[k] for v in start.values()], 3 if k == "nmi" else 2) for k in QUALITY) + " | -" * (len(QUALITY) + 1)
        + " |")
    for method in [control, *sorted(m for m in runs if m != control)]:
        seeds = runs.get(method, {})
        if not seeds:
            continue
        row = {"method": method, "seeds": sorted(seeds)}
        cells = []
        for k in QUALITY:
            row[k] = [seeds[s][k] for s in sorted(seeds)]
            cells.append(pm(row[k], 3 if k == "nmi" else 2))
        for k in QUALITY:
            diffs = paired(seeds, runs[control], k) if method != control else []
            row[f"{k}_vs_control"] = diffs
            digits = 3 if k == "nmi" else 2
            cells.append(f"{pm(diffs, digits)} ({verdict(diffs)})" if diffs else "-")
        diffs = paired(seeds, start, "knn_pooled")
        row["knn_vs_start"] = diffs
        cells.append(f"{pm(diffs)} ({verdict(diffs)})")
        label = f"{method} (the control: the start trained on by {control})" if method == control else method
        lines.append(f"| {label} | {len(seeds)} | " + " | ".join(cells) + " |")
        rows.append(row)
    return head + "\n".join(lines) + "\n", rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", required=True, help="benchmarks.run folder of the starting networks")
    p.add_argument("--start-method", default="is")
    p.add_argument("--runs", nargs="+", required=True, help="benchmarks.run folders of the fine-tuning runs")
    p.add_argument("--control", default="is", help="the method that trains the start further (no clustering)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    data: dict[str, Any] = {}  # the decoded images, shared by every run on the same data
    start = per_seed([args.start], data)[args.start_method]
    runs = per_seed(args.runs, data)
    md, rows = table(start, runs, args.control, args.start_method)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps({"start": start, "rows": rows}, indent=1))
    (out / "finetune.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
