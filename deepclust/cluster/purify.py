"""PCP's building blocks (Zhang et al.): the progressive cluster count, CP_r and CP_s.

Pure functions of tensors; the method keeps the state (the assignment history) in buffers. Everything is
vectorised over samples: no loop over clusters, so N_t close to N (early epochs) costs no more than N_t = 10.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def progressive_cluster_count(epoch: int, epochs: int, num_samples: int, floor: int) -> int:
    """N_t of the paper's Eq. 1, lg N_t = (1 - t/T) lg N (so N_0 = N), never below ``floor`` nor above N."""
    n_t = int(num_samples ** (1 - epoch / epochs) + 1e-6)  # N^(1-t/T) = 10^((1-t/T) lg N); 1e-6: 10^lg N is N
    return min(num_samples, max(floor, n_t))


def squared_distances(x: torch.Tensor, assignments: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """|x_i - c_{a_i}|^2 of every sample to its own centroid."""
    return ((x - centroids[assignments]) ** 2).sum(1)


def rank_in_cluster(assignments: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Each sample's rank within its cluster by distance to the centroid (0 = nearest; ties by sample id)."""
    by_dist = torch.argsort(dist, stable=True)
    order = by_dist[torch.argsort(assignments[by_dist], stable=True)]  # by cluster, then by distance
    sorted_clusters = assignments[order]
    position = torch.arange(order.numel(), device=order.device)
    first = torch.ones_like(sorted_clusters, dtype=torch.bool)
    first[1:] = sorted_clusters[1:] != sorted_clusters[:-1]
    start = torch.cummax(torch.where(first, position, torch.zeros_like(position)), 0).values
    rank = torch.empty_like(position)
    rank[order] = position - start
    return rank


def cluster_anchors(assignments: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) the member of each cluster nearest its centroid (CP_s's anchor); -1 for an empty cluster."""
    anchors = torch.full((k,), -1, dtype=torch.long, device=assignments.device)
    nearest = torch.nonzero(rank_in_cluster(assignments, dist) == 0).flatten()
    anchors[assignments[nearest]] = nearest
    return anchors


def nearest_fraction(assignments: torch.Tensor, dist: torch.Tensor, k: int, fraction: float) -> torch.Tensor:
    """CP_r: a (N,) mask of the floor(fraction * size) members of each cluster nearest its centroid."""
    sizes = torch.bincount(assignments, minlength=k)
    quota = torch.floor(sizes.double() * fraction).long()  # the authors' int(len * ratio)
    return rank_in_cluster(assignments, dist) < quota[assignments]


def vote_scores(assignments: torch.Tensor, history: torch.Tensor, anchors: torch.Tensor, alpha: float) -> torch.Tensor:
    """CP_s's Eq. 2: V_j = sum_{a=0..n} alpha^a * delta(C_{t-a}(j), C_{t-a}(anchor of j's cluster at t)).

    ``history`` (n, N): row a-1 holds the assignments of a epochs ago; rows still filled with -1 (not yet
    recorded) are skipped. delta is +1 for the same cluster, -1 otherwise; the a = 0 term (this epoch) is +1.
    """
    anchor_of = anchors[assignments]
    scores = torch.ones(assignments.numel(), dtype=torch.float64, device=assignments.device)
    for age, past in enumerate(history, start=1):
        if bool((past < 0).any()):
            continue
        same = past == past[anchor_of]
        scores += alpha**age * (same.double() * 2 - 1)
    return scores


@dataclass
class Purification:
    groups: torch.Tensor  # (N,) the cluster id for members of a purified cluster, N + i for instance class i
    in_cluster: torch.Tensor  # (N,) bool: in a purified cluster of 2 or more
    dropped: int  # CP_r kept it, CP_s dropped it
    pulled_back: int  # CP_r filtered it, CP_s pulled it back


def purify(assignments: torch.Tensor, dist: torch.Tensor, k: int, keep_fraction: float | None = 0.5,
           scores: torch.Tensor | None = None, drop_below: float = 0.0, pull_back_at: float = 3.0) -> Purification:
    """CP_r (``keep_fraction``; None keeps every member) then CP_s (``scores``; None skips it).

    Every sample that ends up alone, whether its cluster had one member or purification left only it,
    is its own instance class; it never affects any other cluster.
    """
    n = assignments.numel()
    if keep_fraction is None:
        reliable = torch.ones(n, dtype=torch.bool, device=assignments.device)
    else:
        reliable = nearest_fraction(assignments, dist, k, keep_fraction)
    kept, dropped, pulled = reliable, 0, 0
    if scores is not None:
        drop = reliable & (scores < drop_below)
        pull = ~reliable & (scores >= pull_back_at)
        kept = (reliable & ~drop) | pull
        dropped, pulled = int(drop.sum()), int(pull.sum())
    kept_sizes = torch.bincount(assignments[kept], minlength=k)
    in_cluster = kept & (kept_sizes[assignments] >= 2)
    instance_ids = n + torch.arange(n, device=assignments.device)
    return Purification(torch.where(in_cluster, assignments, instance_ids), in_cluster, dropped, pulled)


def group_purity(groups: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the ``mask``ed samples (at least one) whose true label is the majority label of their group."""
    g, y = groups[mask], labels.to(groups.device)[mask]
    pairs, counts = torch.unique(torch.stack((g, y)), dim=1, return_counts=True)
    _, group_of_pair = torch.unique(pairs[0], return_inverse=True)
    majority = torch.zeros(int(group_of_pair.max()) + 1, dtype=counts.dtype, device=counts.device)
    majority.scatter_reduce_(0, group_of_pair, counts, reduce="amax")
    return float(majority.sum()) / int(mask.sum())
