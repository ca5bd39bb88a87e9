"""Where each sample sits in its cluster: distance to the cluster's centre and a confidence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kmeans import centroid_sums


@dataclass
class ClusterGeometry:
    centres: torch.Tensor  # (k, d) mean of each cluster's members (rows of an empty id are NaN)
    sizes: torch.Tensor  # (k,) members per cluster id
    distance: torch.Tensor  # (N,) Euclidean distance to the own centre (NaN for unassigned samples)
    confidence: torch.Tensor  # (N,) simplified silhouette in [-1, 1] (NaN for unassigned samples)


@torch.no_grad()
def cluster_geometry(x: torch.Tensor, assignments: torch.Tensor, chunk: int = 4096) -> ClusterGeometry:
    """Centres of the clusters given by ``assignments`` (ids >= 0; -1: unassigned), and for every row
    its distance a to its own centre and its confidence (b - a) / max(a, b), b the distance to the
    nearest other centre: 1 at the centre, 0 halfway, negative when another centre is nearer (the
    "simplified silhouette"). With one cluster every member's confidence is 1."""
    x = x.float()
    assigned = assignments >= 0
    k = int(assignments.max()) + 1 if bool(assigned.any()) else 0
    sums, sizes = centroid_sums(x[assigned], assignments[assigned], k)
    centres = sums / sizes.unsqueeze(1).to(x.dtype)  # 0/0 = NaN marks empty ids
    live = centres[sizes > 0]
    live_id = torch.nonzero(sizes > 0).flatten()
    n = x.shape[0]
    distance = torch.full((n,), float("nan"))
    confidence = torch.full((n,), float("nan"))
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        own = assignments[rows]
        ok = own >= 0
        if not bool(ok.any()):
            continue
        d = torch.cdist(x[rows][ok], live)  # (b, live)
        own_col = torch.searchsorted(live_id, own[ok])
        a = d.gather(1, own_col.unsqueeze(1)).squeeze(1)
        d.scatter_(1, own_col.unsqueeze(1), float("inf"))
        b = d.min(1).values if d.shape[1] > 1 else torch.full_like(a, float("inf"))
        conf = torch.where(torch.isinf(b), torch.ones_like(a), (b - a) / torch.maximum(a, b).clamp(min=1e-12))
        idx = torch.arange(start, min(start + chunk, n))[ok.cpu()]
        distance[idx], confidence[idx] = a.cpu(), conf.cpu()
    return ClusterGeometry(centres, sizes, distance, confidence)
