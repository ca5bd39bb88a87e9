"""PCA with whitening, as DeepCluster applies before k-means."""

from __future__ import annotations

import logging

import torch

from .kmeans import check_finite

log = logging.getLogger(__name__)


def pca_whiten(x: torch.Tensor, dim: int, eps: float = 1e-5) -> torch.Tensor:
    """Project centred rows onto the top ``dim`` principal axes, scaled to unit variance.

    ``dim`` is capped at the feature width and at N - 1 (the rank of centred data); a cap is logged,
    never an error, so tiny datasets still cluster.
    """
    n, d = x.shape
    check_finite(x, "PCA")
    cap = min(dim, d, max(1, n - 1))
    if cap < dim:
        log.warning("PCA to %d dimensions instead of %d (features have %d dims, %d samples)", cap, dim, d, n)
    xd = x.double()
    xc = xd - xd.mean(0, keepdim=True)
    cov = xc.t() @ xc / max(1, n - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:cap], evecs.flip(1)[:, :cap]
    proj = evecs / torch.sqrt(evals.clamp(min=0) + eps)
    return (xc @ proj).to(x.dtype)
