"""Sinkhorn-Knopp: soft assignments of samples to prototypes with equal-sized clusters (SeLa, SwAV).

The transport plan Q (samples x prototypes) maximises <Q, scores> + epsilon H(Q) under the constraints that
each prototype receives 1/K of the mass and each sample 1/n. A fixed number of iterations (no host read to test
convergence), and under torchrun over the samples of every rank: the per-prototype sums are reduced across ranks,
as the SwAV code does. The scores are shifted by their maximum (over every rank) before the exponential, which
changes nothing after the first normalisation and keeps exp from overflowing; a range of scores / epsilon beyond
float32's (about 87: SwAV's cosines at epsilon 0.05 span 40) needs ``dtype=torch.float64``, and unbounded logits
(SeLa's, times lambda = 25) need ``sinkhorn_log``. (A per-sample shift would need no collective, but it changes the
plan after a fixed number of iterations.)
"""

from __future__ import annotations

import math

import torch

from .. import distributed
from ..runtime import exact_float32


@exact_float32()
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, active: torch.Tensor | None = None,
             across_ranks: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (n, K) in float32: row i is sample i's distribution over the K prototypes (rows sum to 1).

    ``scores`` (n, K): similarities (SwAV: cosine to unit prototypes) or logits (SeLa: epsilon = 1 / lambda).
    ``active`` (n,) bool on the device: rows that take part (SwAV's queue before it is full does not); the rest
    get zero codes. ``across_ranks``: the n rows are this rank's part of the samples (False: all of them).
    """
    s = scores.to(dtype)
    top = s.max()
    if across_ranks:
        top = distributed.all_reduce_max(top)
    # In place from here: Q is one fresh (n, K) tensor rescaled where it lies. A new tensor for every step (the
    # SwAV code's ``Q /= ...`` is in place too) cost 4.7x the time on a CPU at SwAV's queue size, 3968 x 3000,
    # mostly in faulting in fresh pages (BENCHMARKS.md, "Sinkhorn in place"); the values are the same bits.
    q = (s - top).div_(epsilon).exp_()
    tiny = torch.finfo(dtype).tiny
    count = s.new_full((), s.shape[0])  # a fill on the device, not a copy of a host scalar
    if active is not None:
        q.mul_(active.unsqueeze(1))
        count = active.sum().to(dtype)  # a device scalar: nothing read on the host
    if across_ranks:
        count = distributed.all_reduce_sum(count)
    k = s.shape[1]
    for _ in range(iterations):
        per_prototype = q.sum(0)
        if across_ranks:
            per_prototype = distributed.all_reduce_sum(per_prototype)
        q.div_(per_prototype.clamp_(min=tiny).mul_(k))  # each prototype: 1/K of the mass
        q.div_(q.sum(1, keepdim=True).clamp_(min=tiny).mul_(count))  # each sample: 1/n (inactive rows stay 0)
    return q.mul_(count).float()


@exact_float32()
@torch.no_grad()
def sinkhorn_log(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """``sinkhorn`` of all the samples in one process, in the log domain: any range of scores / epsilon (SeLa's
    logits at lambda = 25 span thousands, where exp of the shifted scores is 0 for whole prototypes even in
    float64). About 5x the exp domain's time on a CPU; SeLa runs it once per label update, not per step."""
    log_q = scores.float() / epsilon
    log_n, log_k = math.log(scores.shape[0]), math.log(scores.shape[1])
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - log_k  # each prototype: 1/K of the mass
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - log_n  # each sample: 1/n
    return torch.exp(log_q + log_n)


@exact_float32()
@torch.no_grad()
def sinkhorn_labels(logits: torch.Tensor, lam: float, iterations: int) -> torch.Tensor:
    """SeLa's equal-sized labels of all the samples (one process): the argmax of the transport plan of
    ``sinkhorn_log(logits, 1 / lam, iterations)``. Computed as SeLa's code does, by scaling vectors on P =
    exp(lam (logits - each row's max)) in float64 (two matrix-vector products an iteration instead of two
    log-sum-exps over every entry: about 10x faster on a CPU); when some prototype's column of P is all zero
    (logit ranges beyond float64's exp), in the log domain instead (a host read, once a label update)."""
    s = logits.double() * lam
    p = torch.exp(s - s.max(1, keepdim=True).values)
    if bool((p.sum(0) == 0).any()):
        return sinkhorn_log(logits, 1 / lam, iterations).argmax(1)
    n, k = p.shape
    c = torch.full((n,), 1.0 / n, dtype=p.dtype, device=p.device)  # per sample
    for _ in range(iterations):
        r = (1.0 / k) / (c @ p)  # per prototype: 1/K of the mass
        c = (1.0 / n) / (p @ r)  # per sample: 1/n
    if not bool(torch.isfinite(r).all() and torch.isfinite(c).all()):  # near-empty columns overflowed r
        return sinkhorn_log(logits, 1 / lam, iterations).argmax(1)
    return (p * r).argmax(1)  # c scales a whole row: it does not move the argmax
