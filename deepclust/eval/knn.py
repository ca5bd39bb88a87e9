"""Weighted kNN classification on cosine similarity (NPID's protocol: k = 200, votes exp(s / 0.1))."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..runtime import exact_float32

log = logging.getLogger(__name__)
_clamps_logged: set[tuple[int, int, int]] = set()  # (k asked, k used, N): each said once per process


def usable_k(k: int, train_labels: torch.Tensor) -> int:
    """The largest k at most ``k`` that leaves the vote informative: below the training set size N (k >= N lets
    every image vote, and the class sizes alone decide: a number below chance) and at most the smallest class's
    size times the class count (so that every class could still fill its balanced share k / C of the votes)."""
    n = int(train_labels.numel())
    if n < 2:
        return max(1, min(k, n))
    counts = torch.bincount(train_labels.flatten())
    counts = counts[counts > 0]
    used = min(k, max(1, min(n - 1, int(counts.min()) * counts.numel())))
    if used < k and (k, used, n) not in _clamps_logged:
        _clamps_logged.add((k, used, n))
        log.warning("kNN: k = %d is too many for %d training images (%d classes, the smallest of %d): using k = %d",
                    k, n, counts.numel(), int(counts.min()), used)
    return used


@torch.no_grad()
@exact_float32()  # the evaluation in full float32 whatever the network uses
def knn_predict(test: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                k: int = 200, tau: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores (M, C) for L2-normalised ``test`` (M, d) against ``train`` (N, d).

    Each of the k most similar training rows votes exp(s / tau) for its label; k is capped by ``usable_k``.
    """
    k = usable_k(k, train_labels)
    scores = []
    train_t = train.t().contiguous()
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train_t
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = F.one_hot(train_labels[top_idx], num_classes).float() * (top_sim / tau).exp().unsqueeze(-1)
        scores.append(votes.sum(1))
    return torch.cat(scores)


def knn_accuracy(test: torch.Tensor, test_labels: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor,
                 k: int = 200, tau: float = 0.1) -> float:
    """Top-1 accuracy in percent of the weighted kNN classifier."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(test, train, train_labels, num_classes, k, tau).argmax(1)
    return 100.0 * int((pred == test_labels).sum()) / test_labels.numel()
