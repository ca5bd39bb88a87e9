"""Cross-check ``deepclust eval --protocol knn`` against a weighted kNN computed independently with
scikit-learn on the features that ``deepclust embed`` writes.

    python -m benchmarks.check_knn --checkpoint runs/bench-cpu/npid/checkpoint.pt \
        --data ../shared/datasets/cifar10/train --test-data ../shared/datasets/cifar10/test --out /tmp/knncheck
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors


def sklearn_weighted_knn(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int = 200,
                         tau: float = 0.1) -> np.ndarray:
    """Cosine neighbours by scikit-learn's brute force; each votes exp(similarity / tau)."""
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train)
    dist, idx = nn.kneighbors(test)
    weights = np.exp((1.0 - dist) / tau)
    classes = int(train_labels.max()) + 1
    scores = np.zeros((len(test), classes))
    np.add.at(scores, (np.repeat(np.arange(len(test)), k), train_labels[idx].ravel()), weights.ravel())
    return scores.argmax(1)


def deepclust(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "deepclust.cli", *args], check=True, capture_output=True,
                          text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--test-data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deepclust("embed", "--checkpoint", args.checkpoint, "--data", args.data, "--out", str(out / "train.npz"))
    deepclust("embed", "--checkpoint", args.checkpoint, "--data", args.test_data, "--split", "test",
              "--out", str(out / "test.npz"))
    ours = json.loads(deepclust("eval", "--checkpoint", args.checkpoint, "--data", args.data, "--test-data",
                                args.test_data, "--protocol", "knn", "--json"))
    tr, te = np.load(out / "train.npz"), np.load(out / "test.npz")
    pred = sklearn_weighted_knn(tr["features"], tr["labels"], te["features"])
    reference = 100.0 * float((pred == te["labels"]).mean())
    report = {"deepclust_eval_knn_top1": ours["knn_top1"], "sklearn_on_embed_knn_top1": reference,
              "difference": ours["knn_top1"] - reference, "train": int(len(tr["labels"])),
              "test": int(len(te["labels"])), "feature": ours["feature"]}
    print(json.dumps(report, indent=1))
    return 0 if abs(report["difference"]) <= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
