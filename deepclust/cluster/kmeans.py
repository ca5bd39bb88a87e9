"""k-means in plain torch (one code path for CPU, GPU and, by all-reducing the centroid sums, many GPUs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..distributed import all_reduce_sum, gather_rows_at, local_part, part_sizes
from ..runtime import exact_float32

log = logging.getLogger(__name__)


class ClusteringError(ValueError):
    """Clustering asked for something the data cannot give (more clusters than samples, ...)."""


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, d)
    assignments: torch.Tensor  # (N,) int64, every cluster non-empty
    inertia: float  # sum of squared distances to the assigned centroid
    passes: int = 0  # assignment passes run (fewer than asked when the assignments stopped changing)


def row_argmax(scores: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1. On CPU through NumPy, whose SIMD argmax was 7x faster than torch's here."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(scores.numpy().argmax(1))
    return scores.argmax(1)


SAMPLES_PER_CLUSTER = 50  # the papers' density: k = 1000 for CIFAR-10's 50,000 images
MAX_AUTO_CLUSTERS = 10_000  # DeepCluster's and ODC's ImageNet k


def cluster_count(k: int | None, n: int, who: str = "k-means") -> int:
    """``k`` when given (checked against ``n``); when None, about 50 samples a cluster, from 2 to 10,000.

    The papers' k (1000 for 50,000 images) leaves a user's 8,000 images with 8 samples a cluster, and
    DeepCluster's loss then stays at log k; a k chosen from N keeps the papers' cluster size.
    """
    if k is None:
        k = max(2, min(MAX_AUTO_CLUSTERS, n // SAMPLES_PER_CLUSTER, n))
        log.info("%s: k = %d clusters for %d samples (about %d a cluster; set k=... to choose)", who, k, n,
                 n // k)
    check_cluster_count(k, n, who)
    return k


def check_cluster_count(k: int, n: int, who: str = "k-means") -> None:
    """Clusters must be at least 1 and at most the number of samples."""
    if k < 1:
        raise ClusteringError(f"{who}: k must be at least 1, got {k}")
    if k > n:
        raise ClusteringError(f"{who}: k = {k} clusters but only {n} samples; pass k <= {n}")


def check_finite(x: torch.Tensor, who: str = "k-means") -> None:
    """Features with NaN or inf (a diverged network) would give meaningless clusters: refuse them."""
    bad = int((~torch.isfinite(x)).any(1).sum())
    if bad:
        raise ClusteringError(f"{who}: {bad} of {x.shape[0]} feature rows are NaN or infinite (the network has "
                              "diverged); lower lr, or resume from an earlier checkpoint")


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """[x, 1]: lets one matrix product add each centroid's -|c|^2 / 2 (no separate bias pass)."""
    return torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)), 1)


@exact_float32()  # no TF32: a 1e-3 error in x . c moves points between near centroids
def assign(x_ones: torch.Tensor, centroids: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (L2) of every row of ``with_ones(x)``, and its score x . c - |c|^2 / 2.

    argmin |x - c|^2 = argmax (x . c - |c|^2 / 2): one matrix product per chunk of rows, each chunk
    small enough to stay in cache, written into one reused buffer; no N x k matrix is ever held.
    """
    c_ones = torch.cat((centroids, -0.5 * (centroids * centroids).sum(1, keepdim=True)), 1).t().contiguous()
    n = x_ones.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=x_ones.device)
    best = torch.empty(n, dtype=x_ones.dtype, device=x_ones.device)
    buf = torch.empty(min(chunk, n), centroids.shape[0], dtype=x_ones.dtype, device=x_ones.device)
    for start in range(0, n, chunk):
        rows = x_ones[start:start + chunk]
        scores = torch.mm(rows, c_ones, out=buf[: rows.shape[0]])
        idx = row_argmax(scores).to(x_ones.device)
        labels[start:start + chunk] = idx
        best[start:start + chunk] = scores.gather(1, idx.unsqueeze(1)).squeeze(1)
    return labels, best


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid (L2) for every row, and the squared distance to it."""
    labels, best = assign(with_ones(x), centroids, chunk)
    return labels, ((x * x).sum(1) - 2 * best).clamp_(min=0)


def centroid_sums(x: torch.Tensor, assignments: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts; the one place a distributed run would all-reduce."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assignments, x)
    counts = torch.bincount(assignments, minlength=k)
    return sums, counts


def split_empty_clusters(x: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor,
                         gen: torch.Generator, eps: float = 1e-4) -> torch.Tensor:
    """Give every empty cluster half of a non-empty one (DeepCluster's repair).

    An empty cluster e takes a donor d with more than one member (probability proportional to its size
    less one), c_e and c_d become perturbed copies of c_d, and d's members go to the nearer of the two. If
    they cannot be told apart (duplicates), a random half moves. Done in rounds, each pairing as many empty
    clusters as there are donors (distinct donors, drawn without replacement) with whole-tensor operations:
    the donors double each round, so k empty clusters take about log2(k) rounds, not a Python step each
    (PCP's first epoch clusters with k = N). Edits ``centroids`` in place; returns the new assignments.
    """
    k, d = centroids.shape
    counts = torch.bincount(assignments, minlength=k)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() == 0:
        return assignments
    check_cluster_count(k, x.shape[0])
    assignments = assignments.clone()
    device = assignments.device
    while empty.numel():
        # the draws on the CPU generator (a seed gives the same repair on any device); one copy of k sizes a round
        weights = (counts - 1).clamp(min=0).float().cpu()
        m = min(empty.numel(), int((weights > 0).sum()))
        donors = torch.multinomial(weights, m, replacement=False, generator=gen).to(device)
        targets, empty = empty[:m], empty[m:]
        noise = (eps * torch.randn(m, d, generator=gen)).to(centroids)
        centroids[targets] = centroids[donors] + noise
        centroids[donors] = centroids[donors] - noise
        pair_of = torch.full((k,), -1, dtype=torch.long, device=device)
        pair_of[donors] = torch.arange(m, device=device)
        members = torch.nonzero(pair_of[assignments] >= 0).flatten()  # every donor's members, any order
        pair = pair_of[assignments[members]]
        rows = x[members].to(centroids.dtype)
        side = ((rows - centroids[targets[pair]]) ** 2).sum(1) < ((rows - centroids[donors[pair]]) ** 2).sum(1)
        size = counts[donors]
        moved = torch.bincount(pair, weights=side.to(torch.float64), minlength=m)
        one_sided = (moved == 0) | (moved == size)
        if bool(one_sided.any()):  # identical points: a random half of the pair's members moves instead
            key = torch.rand(members.numel(), generator=gen).to(device)
            by_pair = torch.argsort(key)
            by_pair = by_pair[torch.argsort(pair[by_pair], stable=True)]  # grouped by pair, random within
            first = torch.cumsum(size, 0) - size  # where each pair's members start in by_pair
            place = torch.empty_like(by_pair)
            place[by_pair] = torch.arange(members.numel(), device=device) - first[pair[by_pair]]
            side = torch.where(one_sided[pair], place < size[pair] // 2, side)
        assignments[members[side]] = targets[pair[side]]
        counts = torch.bincount(assignments, minlength=k)
    return assignments


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, chunk: int | None = None,
           n_init: int = 1, shard: bool = True) -> KMeansResult:
    """Lloyd's k-means: up to ``iters`` assignment passes, empty clusters split after each; it stops early at
    a fixed point (a pass that changes no assignment would repeat itself exactly), e.g. PCP's k near N.

    Initial centroids are k distinct random rows (as faiss). With ``n_init`` > 1 it restarts from
    seeds seed, seed + 1, ... and keeps the lowest inertia. The returned centroids are the means of
    the returned assignments, and no cluster is empty. The assignment pass takes ``chunk`` rows a product:
    by default 1,024 on a CPU (they stay in cache), and on a GPU as many as fill a 256 MiB score matrix (a
    few launches a pass instead of N / 1,024).

    Under torchrun every rank must call it with the same ``x``: each assigns its part of the rows and the
    parts and sums are exchanged. ``shard=False`` makes no collective at all (each rank clusters all rows
    itself), for a caller that some ranks may reach and others not, or with other rows (ODC's repair).
    """
    if chunk is None:
        chunk = 1024 if x.device.type == "cpu" else max(1024, 2**26 // (k + 1))
    if n_init > 1:
        runs = [kmeans(x, k, iters, seed + i, chunk, shard=shard) for i in range(n_init)]
        return min(runs, key=lambda r: r.inertia)
    n = x.shape[0]
    check_cluster_count(k, n)
    check_finite(x)
    gen = torch.Generator().manual_seed(seed)
    x = x.contiguous()
    x_ones = with_ones(x)
    centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    assignments = torch.zeros(n, dtype=torch.long, device=x.device)
    # under torchrun each rank assigns its part of the rows, and the sums are all-reduced
    part = local_part(n) if shard else slice(0, n)
    previous, passes = None, 0
    for _ in range(max(1, iters)):
        passes += 1
        assignments = assign(x_ones[part], centroids, chunk)[0]
        if shard:
            assignments = gather_rows_at(assignments, part_sizes(n))[0]
        if previous is not None and torch.equal(assignments, previous):
            break  # the centroids are already these assignments' means (and none is empty)
        assignments = split_empty_clusters(x, centroids, assignments, gen)
        previous = assignments
        sums, counts = centroid_sums(x[part], assignments[part], k)
        if shard:
            all_reduce_sum(sums)
            all_reduce_sum(counts)
        centroids = sums / counts.unsqueeze(1).to(x.dtype)
    inertia = float(((x - centroids[assignments]) ** 2).sum())
    return KMeansResult(centroids, assignments, inertia, passes)


def split_in_two(x: torch.Tensor, seed: int, min_side: int) -> torch.Tensor:
    """A bool mask of one half of the rows of ``x``: 2-means, or a median cut along the 2-means axis when
    2-means leaves a side with ``min_side`` members or fewer. No collective: under torchrun ranks may call it
    a different number of times (see ``dissolve_small_clusters``)."""
    result = kmeans(x, 2, iters=10, seed=seed, shard=False)
    side = result.assignments == 1
    if min_side < int(side.sum()) < x.shape[0] - min_side:
        return side
    axis = result.centroids[1] - result.centroids[0]
    if not torch.any(axis != 0):
        axis = x[0] - x.mean(0) if x.shape[0] > 1 else torch.ones_like(x[0])
    proj = x @ axis
    side = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    side[proj.argsort()[x.shape[0] // 2:]] = True
    return side


@torch.no_grad()
def dissolve_small_clusters(labels: torch.Tensor, rows_of, centroids: torch.Tensor, min_size: int,
                            seed: int) -> torch.Tensor | None:
    """ODC's repair, in place on ``labels``: clusters of ``min_size`` members or fewer are dissolved into the
    nearest normal ones (by ``centroids``), then each freed id takes one half of the then-largest cluster
    (2-means on ``rows_of(member ids)``). Ids stay 0..k-1 and none ends up small or empty. Returns the mask
    of clusters whose members changed (their centroids are stale), or None when nothing was small.

    It makes no collective, so that replicas whose labels have drifted apart cannot hang in it; a caller under
    torchrun broadcasts one rank's result (ODC's ``refresh``)."""
    k = centroids.shape[0]
    counts = torch.bincount(labels, minlength=k)
    small = torch.nonzero(counts <= min_size).flatten()
    if small.numel() == 0:
        return None
    normal = torch.nonzero(counts > min_size).flatten()
    if normal.numel() == 0:
        raise ClusteringError("odc: every cluster is small; lower min_cluster or k")
    members = torch.nonzero(torch.isin(labels, small)).flatten()
    if members.numel():
        nearest, _ = nearest_centroid(rows_of(members), centroids[normal])
        labels[members] = normal[nearest]
    for i, s in enumerate(small.tolist()):
        counts = torch.bincount(labels, minlength=k)
        rows = torch.nonzero(labels == int(counts.argmax())).flatten()
        labels[rows[split_in_two(rows_of(rows), seed * 1000 + i, min_size)]] = s
    changed = torch.zeros(k, dtype=torch.bool, device=labels.device)
    changed[normal] = True  # normal clusters received members
    changed[small] = True
    return changed


@exact_float32()
@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0,
                     chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere as DeepClusterV2 runs it: ``iters`` passes of assigning each (unit) row to the
    centroid of the largest dot product and setting each centroid to its members' normalised mean; an empty
    cluster keeps its centroid (no split). Starts from k distinct random rows. Returns (unit centroids (k, d),
    labels (N,)) with the labels of the last centroids. No collective: every rank calling it with the same rows
    gets the same result up to float summation order (a caller under torchrun broadcasts one rank's)."""
    n = x.shape[0]
    check_cluster_count(k, n, "spherical k-means")
    check_finite(x, "spherical k-means")
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(x.float(), dim=1)
    centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    for it in range(iters + 1):
        for start in range(0, n, chunk):
            labels[start:start + chunk] = (x[start:start + chunk] @ centroids.t()).argmax(1)
        if it == iters:
            break
        sums, counts = centroid_sums(x, labels, k)
        moved = torch.nn.functional.normalize(sums, dim=1)
        centroids = torch.where((counts > 0).unsqueeze(1), moved, centroids)
    return centroids, labels
