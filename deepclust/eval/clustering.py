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


def contingency(pred, truth) -> np.ndarray:
    """(clusters, classes) counts of samples in cluster i with class j."""
    pred, truth = as_numpy(pred), as_numpy(truth)
    table = np.zeros((pred.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(table, (pred, truth), 1)
    return table


def hungarian_match(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one cluster -> class map of a contingency table that keeps the most samples: (rows, cols)."""
    return linear_sum_assignment(-table)


def hungarian_accuracy(pred, truth) -> float:
    """Accuracy in percent after mapping each cluster to one class (Hungarian algorithm)."""
    table = contingency(pred, truth)
    rows, cols = hungarian_match(table)
    return 100.0 * float(table[rows, cols].sum()) / len(as_numpy(truth))


def assignment_metrics(pred, truth) -> dict[str, float]:
    """NMI, ARI and Hungarian accuracy (%) of cluster ids ``pred`` against class labels ``truth``."""
    return {"nmi": nmi(pred, truth), "ari": float(adjusted_rand_score(as_numpy(truth), as_numpy(pred))),
            "acc": hungarian_accuracy(pred, truth)}


def cluster_metrics(features: torch.Tensor, labels: torch.Tensor, k: int | None = None, seed: int = 0) -> dict:
    """k-means with the true class count, then NMI, ARI and Hungarian accuracy against ``labels``."""
    k = k or int(labels.max()) + 1
    return assignment_metrics(kmeans(features, k, iters=50, seed=seed, n_init=10).assignments, labels)
