"""Sinkhorn-Knopp: soft assignments of samples to prototypes with equal-sized clusters (SeLa, SwAV).

The transport plan Q (samples x prototypes) maximises <Q, scores> + epsilon H(Q) under the constraints that
each prototype receives 1/K of the mass and each sample 1/n. Computed in the log domain (no overflow at a small
epsilon or with unbounded logits), a fixed number of iterations (no host read to test convergence), and under
torchrun over the samples of every rank: the per-prototype sums are reduced across ranks, as the SwAV code does.
"""

from __future__ import annotations

import math

import torch

from .. import distributed
from ..runtime import exact_float32


@exact_float32()
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, active: torch.Tensor | None = None,
             across_ranks: bool = True) -> torch.Tensor:
    """Codes (n, K): row i is sample i's distribution over the K prototypes (rows sum to 1).

    ``scores`` (n, K): similarities (SwAV: cosine to unit prototypes) or logits (SeLa: epsilon = 1 / lambda).
    ``active`` (n,) bool on the device: rows that take part (SwAV's queue before it is full does not); the rest
    get zero codes. ``across_ranks``: the n rows are this rank's part of the samples (False: all of them).
    """
    log_q = scores.float() / epsilon
    rows = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device) if active is None else active
    log_q = log_q.masked_fill(~rows.unsqueeze(1), -math.inf)
    count = rows.sum().float()  # samples taking part (a device scalar: nothing read on the host)
    reduce = distributed.all_reduce_logsumexp if across_ranks else (lambda x, dim: torch.logsumexp(x, dim))
    if across_ranks:
        count = distributed.all_reduce_sum(count)
    log_n, log_k = torch.log(count), math.log(scores.shape[1])
    for _ in range(iterations):
        log_q = log_q - reduce(log_q, 0).unsqueeze(0) - log_k  # each prototype: 1/K of the mass
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - log_n  # each sample: 1/n
        log_q = log_q.masked_fill(~rows.unsqueeze(1), -math.inf)  # inactive rows: -inf - -inf is NaN
    return torch.exp(log_q + log_n)
