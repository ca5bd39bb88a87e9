"""Strongly connected subgraphs (SCS) of a k-out neighbour graph, as PAD searches them (Huang et al. 2020).

From a start vertex, a depth-first search follows out-edges nearest neighbour first, each vertex visited
once per search. The group grows by ears: whenever the vertex on top of the search path has an edge into
the group, the path's vertices outside the group (a path leaving the group and coming back) join it. The
first ear is a cycle through the start; later ones are the paper's "cycles that may exclude the start as
long as they overlap the former". Adding an ear to a strongly connected set keeps it strongly connected,
so every group is strongly connected through edges inside it. With the size cap s, the search never
descends further than an ear could still fit, and stops when the group has s vertices. A group of two
or more vertices leaves the graph; the start of a search that found no cycle stays (it may join a later
group) and a vertex that never joins one is isolated.

Choices the paper leaves open (PAD has no public code): starts are taken in ``order``; a search gives
up after ``max_visits`` vertices that did not join (default 8 k), which makes the whole search
O(N k max_visits) instead of the paper's O(N^2); vertices a search leaves unvisited because the path
was already too long for an ear to fit may be visited again deeper in the tree (the cap prunes, it does
not mark). ``cyclic=False`` (the paper's ablation): every vertex the search reaches joins, up to s.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(cache=True)
def _search(neighbours, order, cap, cyclic, max_visits):  # pragma: no cover - compiled
    n, k = neighbours.shape
    # One mark per vertex, so that testing an edge's head costs one random read, not three (at N = 10^6
    # nothing stays in cache): `taken` once in a group, 2 sid when search sid visited it, 2 sid + 1 when
    # that search's group holds it. Search ids rise, so older marks are lower.
    taken = -1
    mark = np.full(n, -2, neighbours.dtype)
    group = np.full(n, -1, np.int64)
    path = np.empty(n, np.int64)
    edge = np.empty(n, np.int64)  # next out-edge to try, per path position
    found = np.empty(n, np.int64)
    groups = 0
    for sid in range(order.shape[0]):
        start = order[sid]
        if mark[start] == taken:
            continue
        visited, held = 2 * sid, 2 * sid + 1
        mark[start] = held
        found[0] = start
        size, visits, top, prefix = 1, 1, 0, 1  # path[:prefix] are group members
        path[0] = start
        edge[0] = 0
        while top >= 0 and size < cap:
            u = path[top]
            e = edge[top]
            if e == k:
                top -= 1
                prefix = min(prefix, top + 1)
                continue
            edge[top] = e + 1
            w = neighbours[u, e]
            if w < 0:
                continue
            m = mark[w]
            if m == taken:
                continue
            if not cyclic:
                if m < visited:
                    mark[w] = held
                    found[size] = w
                    size += 1
                    top += 1
                    path[top] = w
                    edge[top] = 0
                continue
            if m == held:  # an ear closes: the path's non-members join
                for p in range(prefix, top + 1):
                    mark[path[p]] = held
                    found[size] = path[p]
                    size += 1
                prefix = top + 1
                continue
            if m == visited or top + 2 - prefix > cap - size or visits - size >= max_visits:
                continue
            mark[w] = visited
            visits += 1
            top += 1
            path[top] = w
            edge[top] = 0
        if size >= 2:
            for p in range(size):
                group[found[p]] = groups
                mark[found[p]] = taken
            groups += 1
    return group


def strongly_connected_subgraphs(neighbours: torch.Tensor, max_size: int | None = 10, cyclic: bool = True,
                                 order: torch.Tensor | None = None, max_visits: int | None = None) -> torch.Tensor:
    """Disjoint strongly connected groups of the graph i -> neighbours[i, :] (N, k), nearest first, -1 padded.

    Returns (N,) int64 group ids 0..G-1, -1 for isolated vertices, on ``neighbours``' device. ``max_size``:
    the scale cap s (None: none). ``order``: the start vertices in turn (default 0..N-1). See the module
    docstring for the search and its choices.
    """
    if neighbours.dim() != 2:
        raise ValueError(f"neighbours must be (N, k), got shape {tuple(neighbours.shape)}")
    n, k = neighbours.shape
    if max_size is not None and max_size < 2:
        raise ValueError(f"max_size must be at least 2 (a group of one is an isolated vertex), got {max_size}")
    nb = neighbours.detach().cpu().numpy()
    if nb.size and (nb.max() >= n or nb.min() < -1):  # checked before the cast below, which would wrap ids
        raise ValueError(f"neighbour ids must lie in [0, {n}) or be -1 (no edge)")
    start = np.arange(n, dtype=np.int64) if order is None else np.ascontiguousarray(order.cpu().numpy(), np.int64)
    # int32 ids and marks halve the bytes fetched per edge (the search is memory-bound) while the largest
    # mark, 2 x (search count) + 1, fits
    ids = np.int32 if 2 * max(n, start.size) + 1 < 2**31 else np.int64
    nb = np.ascontiguousarray(nb.astype(ids, copy=False))
    cap = n if max_size is None else max_size
    budget = 8 * k if max_visits is None else max_visits
    return torch.from_numpy(_search(nb, start, cap, cyclic, budget)).to(neighbours.device)


def group_sizes(group: torch.Tensor) -> torch.Tensor:
    """Size of each group id 0..G-1 of ``group`` (-1 entries are isolated)."""
    return torch.bincount(group[group >= 0])


def member_table(group: torch.Tensor) -> torch.Tensor:
    """(G, largest group) the member ids of each group 0..G-1 of ``group``, ascending, -1 padded (one row of
    -1 when there is no group): a sample's fellow members without an (N,)-wide mask per sample."""
    n = group.numel()
    ids = torch.nonzero(group >= 0).flatten()
    if ids.numel() == 0:
        return torch.full((1, 1), -1, dtype=torch.long, device=group.device)
    ids = ids[torch.argsort(group[ids] * n + ids)]  # by group, then by id
    g = group[ids]
    sizes = torch.bincount(g)
    first = torch.cumsum(sizes, 0) - sizes
    table = torch.full((sizes.numel(), int(sizes.max())), -1, dtype=torch.long, device=group.device)
    table[g, torch.arange(ids.numel(), device=group.device) - first[g]] = ids
    return table


def singletons_apart(group: torch.Tensor) -> torch.Tensor:
    """Group ids with each isolated vertex (-1) given an id of its own, N + i: ready for ``label_positives``."""
    n = group.numel()
    return torch.where(group >= 0, group, n + torch.arange(n, device=group.device))


def scs_stats(group: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """SCS count, mean and max size, share of samples in one, and (given labels) precision: the mean over
    grouped samples of the fraction of their fellow members with the same label (the paper's Fig. 4)."""
    sizes = group_sizes(group)
    grouped = group >= 0
    out = {"scs_count": int(sizes.numel()), "scs_mean_size": float(sizes.float().mean()) if sizes.numel() else 0.0,
           "scs_max_size": int(sizes.max()) if sizes.numel() else 0, "scs_share": float(grouped.float().mean())}
    if labels is not None and sizes.numel():
        g, y = group[grouped], labels.to(group.device)[grouped]
        classes = int(y.max()) + 1
        same = torch.zeros(sizes.numel() * classes, device=group.device, dtype=torch.long)
        same.index_add_(0, g * classes + y, torch.ones_like(g))
        agree = same[g * classes + y] - 1  # fellow members of the same class
        out["scs_precision"] = float((agree.float() / (sizes[g] - 1).float()).mean())
    return out
