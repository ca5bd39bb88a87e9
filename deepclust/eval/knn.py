"""Weighted kNN classification on cosine similarity (NPID's protocol: k = 200, votes exp(s / 0.1))."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(test: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                k: int = 200, tau: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores (M, C) for L2-normalised ``test`` (M, d) against ``train`` (N, d).

    Each of the k most similar training rows votes exp(s / tau) for its label.
    """
    k = min(k, train.shape[0])
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
