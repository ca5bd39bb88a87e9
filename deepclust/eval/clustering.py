"""Clustering metrics: NMI, ARI and accuracy under the best one-to-one cluster-to-class map."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ..cluster import kmeans


def as_numpy(labels) -> np.ndarray:
    return labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)


def nmi(a, b) -> float:
    return float(normalized_mutual_info_score(as_numpy(a), as_numpy(b)))


def hungarian_accuracy(pred, truth) -> float:
    """Accuracy in percent after mapping each cluster to one class (Hungarian algorithm)."""
    pred, truth = as_numpy(pred), as_numpy(truth)
    table = np.zeros((pred.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(table, (pred, truth), 1)
    rows, cols = linear_sum_assignment(-table)
    return 100.0 * float(table[rows, cols].sum()) / len(truth)


def cluster_metrics(features: torch.Tensor, labels: torch.Tensor, k: int | None = None, seed: int = 0) -> dict:
    """k-means with the true class count, then NMI, ARI and Hungarian accuracy against ``labels``."""
    k = k or int(labels.max()) + 1
    pred = kmeans(features, k, iters=50, seed=seed, n_init=10).assignments
    return {"nmi": nmi(pred, labels), "ari": float(adjusted_rand_score(as_numpy(labels), as_numpy(pred))),
            "acc": hungarian_accuracy(pred, labels)}
