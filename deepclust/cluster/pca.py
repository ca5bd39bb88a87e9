"""PCA with whitening, as DeepCluster applies before k-means."""

from __future__ import annotations

import logging

import torch

from ..runtime import exact_float32
from .kmeans import check_finite

log = logging.getLogger(__name__)


def pca_whiten(x: torch.Tensor, dim: int, eps: float = 1e-5, chunk: int = 65536,
               stats: dict[str, float] | None = None) -> torch.Tensor:
    """Project centred rows onto the top ``dim`` principal axes, each divided by sqrt(variance + ``eps``).

    ``eps`` is absolute, in the features' own units: a direction whose variance is well above it is whitened to
    unit variance, one well below it is damped, not blown up (and a rank-deficient covariance gives no NaN).
    ``stats``, when given, receives ``pca_damped``: the fraction of the kept directions with variance below
    ``eps``, so that the features' scale never silently decides how much is whitened.

    ``dim`` is capped at the feature width and at N - 1 (the rank of centred data); a cap is logged,
    never an error, so tiny datasets still cluster. The covariance and its eigenvectors are float64, summed a
    ``chunk`` of rows at a time; the projection runs in the input's dtype (float32), so memory stays at N x d.
    """
    n, d = x.shape
    check_finite(x, "PCA")
    cap = min(dim, d, max(1, n - 1))
    if cap < dim:
        log.warning("PCA to %d dimensions instead of %d (features have %d dims, %d samples)", cap, dim, d, n)
    with exact_float32():  # no TF32 in the covariance's float64 products nor in the projection
        return whiten(x, cap, eps, chunk, stats)


def whiten(x: torch.Tensor, cap: int, eps: float, chunk: int, stats: dict[str, float] | None) -> torch.Tensor:
    n, d = x.shape
    # float64 sums of a chunk at a time, the mean too: x.double() would be a float64 copy of all N rows (21 GB at
    # ImageNet's 1.28M x 2048)
    mean = sum(x[start:start + chunk].double().sum(0, keepdim=True) for start in range(0, n, chunk)) / n
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk):
        xc = x[start:start + chunk].double() - mean
        cov += xc.t() @ xc
    evals, evecs = torch.linalg.eigh(cov / max(1, n - 1))  # ascending
    evals, evecs = evals.flip(0)[:cap], evecs.flip(1)[:, :cap]
    evals = evals.clamp(min=0)
    if stats is not None:
        stats["pca_damped"] = float((evals < eps).double().mean())
    proj = (evecs / torch.sqrt(evals + eps)).to(x.dtype)
    return (x - mean.to(x.dtype)) @ proj
