"""Component timings: each building block against the obvious alternative and against its floor.

    python -m benchmarks.components --out DIR [--quick] [--repeats R]

The floor of a compute-bound component is its flop count divided by the float32 matmul rate measured
at the start of the same run (a large torch matmul): no implementation on this machine can beat it by
much, so "x floor" says how far each one is from the hardware. Every timing is the median (and min) of
``repeats`` runs after one untimed warm-up run of a small size. Writes DIR/components.json and DIR/components.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .hostload import CpuWatch, busy_note

SIZES = {
    "full": {"matmul": 4096, "kmeans_n": 50_000, "kmeans_k": 1000, "kmeans_iters": 20, "d": 128,
             "graph_n": 50_000, "graph_k": 5, "graph_approx_n": 210_000,
             "scs_n": [50_000, 1_000_000], "knn_train": 50_000, "knn_test": 10_000, "knn_k": 200,
             "batch": 128, "resnet_batch": 128, "aug_repeats": 10, "tv_repeats": 3,
             "sinkhorn_rows": 3968, "sinkhorn_prototypes": 3000},
    "quick": {"matmul": 2048, "kmeans_n": 5_000, "kmeans_k": 100, "kmeans_iters": 20, "d": 128,
              "graph_n": 5_000, "graph_k": 5, "graph_approx_n": 20_000,
              "scs_n": [5_000, 50_000], "knn_train": 5_000, "knn_test": 1_000, "knn_k": 200,
              "batch": 128, "resnet_batch": 32, "aug_repeats": 5, "tv_repeats": 2,
              "sinkhorn_rows": 3968, "sinkhorn_prototypes": 3000},
}


# ---------------------------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, Any], Any]:
    """Median and min wall time of ``repeats`` calls, and the median CPU time of this process (all its
    threads: with one thread, what other processes on a shared machine do not inflate); returns (stats,
    the last call's result)."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times),
            "cpu_median_s": statistics.median(cpu)}, out


def matmul_rate(n: int, repeats: int = 5) -> dict[str, Any]:
    """float32 GFLOP/s of an n x n x n torch matmul (2 n^3 flops)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    stats, _ = timed(lambda: a @ b, repeats)
    flops = 2 * n**3
    return {"n": n, **stats, "gflops_median": flops / stats["median_s"] / 1e9,
            "gflops_best": flops / stats["min_s"] / 1e9}


def gaussian_mixture(n: int, d: int, components: int, seed: int,
                     spread: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` float32 points from ``components`` Gaussians (unit-variance centres, ``spread`` noise) and their ids."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(components, d, generator=gen)
    labels = torch.randint(0, components, (n,), generator=gen)
    x = centres[labels] + spread * torch.randn(n, d, generator=gen)
    return x.contiguous(), labels


def entry(component: str, impl: str, size: str, stats: dict[str, Any], flops: float | None, rate_gflops: float,
          **extra: Any) -> dict[str, Any]:
    floor = flops / (rate_gflops * 1e9) if flops else None
    return {"component": component, "impl": impl, "size": size, **stats, "flops": flops,
            "gflops_achieved": flops / stats["median_s"] / 1e9 if flops else None,
            "floor_s": floor, "x_floor": stats["median_s"] / floor if floor else None, **extra}


def relative_to_ours(entries: list[dict[str, Any]]) -> None:
    """``vs_ours``: the alternative's median time over ours (>1: ours is faster)."""
    ours = entries[0]["median_s"]
    for e in entries:
        e["time_vs_ours"] = e["median_s"] / ours


# ---------------------------------------------------------------------------------------------- k-means


def bench_kmeans(sz: dict, repeats: int, rate: float) -> list[dict[str, Any]]:
    import faiss
    from sklearn.cluster import KMeans

    from deepclust.cluster import kmeans, nearest_centroid

    n, k, d, iters = sz["kmeans_n"], sz["kmeans_k"], sz["d"], sz["kmeans_iters"]
    # Overlapping components (noise 2x the spread of the centres): Lloyd does not converge within 20
    # iterations, so sklearn (tol=0) and faiss (which stop once nothing changes) run all of them.
    x, _ = gaussian_mixture(n, d, k, seed=1, spread=2.0)
    xnp = x.numpy()
    size = f"N={n:,} d={d} k={k} {iters} it"

    def flops(done: int) -> int:  # the floor counts the iterations an implementation actually ran
        return done * 2 * n * k * d

    def inertia(centroids) -> float:
        _, dist = nearest_centroid(x, torch.as_tensor(np.asarray(centroids), dtype=torch.float32))
        return float(dist.mean())

    small = x[: min(n, 20 * k)]  # warm-ups: thread pools, allocators, imports
    kmeans(small, k, iters=2)
    KMeans(n_clusters=k, init="random", n_init=1, max_iter=2, algorithm="lloyd").fit(small.numpy())

    out = []
    stats, res = timed(lambda: kmeans(x, k, iters=iters, seed=0), repeats)
    out.append(entry("k-means", "deepclust.cluster.kmeans", size, stats, flops(iters), rate,
                     quality=f"mean sq. dist {inertia(res.centroids):.4f}, {iters} it"))

    def sk():
        return KMeans(n_clusters=k, init="random", n_init=1, max_iter=iters, tol=0, algorithm="lloyd",
                      random_state=0).fit(xnp)

    stats, res = timed(sk, repeats)
    out.append(entry("k-means", "sklearn KMeans (lloyd, random init)", size, stats, flops(res.n_iter_), rate,
                     quality=f"mean sq. dist {inertia(res.cluster_centers_):.4f}, {res.n_iter_} it"))

    def fa():
        km = faiss.Kmeans(d, k, niter=iters)
        km.train(xnp)
        return km

    stats, res = timed(fa, repeats)
    out.append(entry("k-means", f"faiss.Kmeans defaults ({faiss.omp_get_max_threads()} threads)", size, stats,
                     flops(len(res.obj)), rate, quality=f"mean sq. dist {inertia(res.centroids):.4f}, "
                                                        f"{len(res.obj)} it"))
    relative_to_ours(out)
    return out


# ---------------------------------------------------------------------------------------------- kNN graph


def faiss_knn_graph(xnp: np.ndarray, k: int) -> np.ndarray:
    import faiss

    from deepclust.cluster.graph import without_self

    index = faiss.IndexFlatIP(xnp.shape[1])
    index.add(xnp)
    sims, idx = index.search(xnp, k + 1)
    return without_self(sims, idx, k)[1]


def neighbour_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of a row's neighbour set shared by both graphs (ties may differ)."""
    hits = sum(len(set(ra) & set(rb)) for ra, rb in zip(a.tolist(), b.tolist(), strict=True))
    return hits / a.size


def sampled_recall(x: torch.Tensor, idx: torch.Tensor, k: int, queries: int = 2000, seed: int = 0) -> float:
    """Recall of an approximate graph ``idx`` against brute force, on a random sample of rows."""
    rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:queries]
    s = x[rows] @ x.t()
    s[torch.arange(rows.numel()), rows] = float("-inf")
    truth = s.topk(k, dim=1).indices
    return neighbour_overlap(truth.numpy(), idx[rows].numpy())


def bench_knn_graph(sz: dict, repeats: int, rate: float) -> list[dict[str, Any]]:
    import faiss

    from deepclust.cluster.graph import exact_knn_graph, ivf_knn_graph

    n, d, k = sz["graph_n"], sz["d"], sz["graph_k"]
    x, _ = gaussian_mixture(n, d, 1000, seed=2)
    x = F.normalize(x, dim=1)
    xnp = x.numpy()
    flops = 2 * n * n * d  # a plain search: ours computes half of it (the matrix is symmetric)
    size = f"N={n:,} d={d} k={k} cosine"
    threads = f"{torch.get_num_threads()} threads"
    exact_knn_graph(x[:4096], k)  # warm-ups (and numba's compilation, cached on disk after the first run)
    exact_knn_graph(x[:4096], k, compiled=False)
    faiss_knn_graph(xnp[:4096], k)
    out = []
    stats, ours = timed(lambda: exact_knn_graph(x, k)[1], repeats)
    out.append(entry("kNN graph", f"deepclust knn_graph exact (symmetric blocks + compiled scan, {threads})", size,
                     stats, flops, rate))
    stats, other = timed(lambda: exact_knn_graph(x, k, compiled=False)[1], repeats)
    out.append(entry("kNN graph", f"deepclust exact, torch top-k selection (the GPU code path, {threads})", size,
                     stats, flops, rate,
                     quality=f"overlap with ours {neighbour_overlap(ours.numpy(), other.numpy()):.4f}"))
    stats, theirs = timed(lambda: faiss_knn_graph(xnp, k), repeats)
    out.append(entry("kNN graph", f"faiss IndexFlatIP search ({faiss.omp_get_max_threads()} threads)", size, stats,
                     flops, rate, quality=f"overlap with ours {neighbour_overlap(ours.numpy(), theirs):.4f}"))
    stats, approx = timed(lambda: ivf_knn_graph(x, k)[1], repeats)
    out.append(entry("kNN graph", "deepclust ivf_knn_graph (faiss IVF, 4 sqrt(N) lists, nprobe 16)", size, stats,
                     flops, rate, quality=f"recall {neighbour_overlap(ours.numpy(), approx.numpy()):.4f}"))
    relative_to_ours(out)
    big = sz["graph_approx_n"]  # above APPROXIMATE_ABOVE: what knn_graph picks on CPU there
    xb = F.normalize(gaussian_mixture(big, d, 1000, seed=5)[0], dim=1)
    stats, approx = timed(lambda: ivf_knn_graph(xb, k)[1], 1)
    out.append(entry("kNN graph", "deepclust ivf_knn_graph (faiss IVF, 4 sqrt(N) lists, nprobe 16)",
                     f"N={big:,} d={d} k={k} cosine", stats, 2 * big * big * d, rate,
                     quality=f"recall {sampled_recall(xb, approx, k):.4f} (2,000 sampled rows vs brute force)"))
    return out


# ---------------------------------------------------------------------------------------------- SCS search


def local_knn_graph(n: int, k: int, piece: int = 1000, seed: int = 6) -> torch.Tensor:
    """A kNN graph with the locality of real features, cheap at any N: n / piece Gaussian mixtures of
    ``piece`` points (10 components, noise 2x their spread) side by side, each one's exact kNN graph."""
    from deepclust.cluster.graph import exact_knn_graph

    out = []
    for start in range(0, n, piece):
        m = min(piece, n - start)
        x, _ = gaussian_mixture(m, 32, 10, seed=seed + start, spread=2.0)
        out.append(exact_knn_graph(F.normalize(x, dim=1), k)[1] + start)
    return torch.cat(out)


def bench_scs(sz: dict, repeats: int, rate: float) -> list[dict[str, Any]]:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    from deepclust.cluster.scs import scs_stats, strongly_connected_subgraphs

    k = sz["graph_k"]
    strongly_connected_subgraphs(torch.tensor([[1], [0]]), 10)  # warm-up (numba loads its cached code)
    out = []
    for n in sz["scs_n"]:
        gen = torch.Generator().manual_seed(7)
        graphs = (("kNN graphs of 1,000-point Gaussian mixtures", local_knn_graph(n, k)),
                  ("uniform random k-out graph (no locality: worst case)", torch.randint(0, n, (n, k), generator=gen)))
        for what, nb in graphs:
            order = torch.randperm(n, generator=gen)
            stats, group = timed(lambda nb=nb, order=order: strongly_connected_subgraphs(nb, 10, order=order), repeats)
            s = scs_stats(group)
            out.append(entry("SCS search (PAD)", "deepclust strongly_connected_subgraphs (s=10, numba)",
                             f"N={n:,} k={k}, {what}", stats, None, rate,
                             quality=f"{s['scs_count']:,} SCS, mean size {s['scs_mean_size']:.2f}, "
                                     f"{100 * s['scs_share']:.1f}% of samples in one"))
            rows = np.repeat(np.arange(n), k)

            def tarjan(nb=nb, rows=rows, n=n):
                graph = csr_matrix((np.ones(n * k, np.int8), (rows, nb.numpy().ravel())), shape=(n, n))
                return connected_components(graph, directed=True, connection="strong")

            stats, (count, _) = timed(tarjan, repeats)
            out.append(entry("SCS search (PAD)", "scipy connected_components(strong), no cap (reference point)",
                             f"N={n:,} k={k}, {what}", stats, None, rate, quality=f"{count:,} components"))
    return out


# ---------------------------------------------------------------------------------------------- kNN eval


def bench_knn_eval(sz: dict, repeats: int, rate: float) -> list[dict[str, Any]]:
    from sklearn.neighbors import KNeighborsClassifier

    from deepclust.eval import knn_predict

    n, m, d, k, tau = sz["knn_train"], sz["knn_test"], sz["d"], sz["knn_k"], 0.1
    x, comp = gaussian_mixture(n + m, d, 100, seed=3, spread=1.5)
    x = F.normalize(x, dim=1)
    labels = comp % 10
    train, test, ytr, yte = x[:n], x[n:], labels[:n], labels[n:]
    flops = 2 * m * n * d
    size = f"{m:,} test x {n:,} train, d={d}, k={k}"
    knn_predict(test[:256], train, ytr, 10, k, tau)

    out = []
    stats, ours = timed(lambda: knn_predict(test, train, ytr, 10, k, tau).argmax(1).numpy(), repeats)
    out.append(entry("weighted kNN eval", "deepclust.eval.knn_predict", size, stats, flops, rate,
                     quality=f"top-1 {100 * float((ours == yte.numpy()).mean()):.2f}%"))

    def sk():
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine",
                                   weights=lambda dist: np.exp((1 - dist) / tau))
        return clf.fit(train.numpy(), ytr.numpy()).predict(test.numpy())

    stats, theirs = timed(sk, repeats)
    out.append(entry("weighted kNN eval", "sklearn KNeighborsClassifier (brute, cosine, exp(s/0.1) weights)", size,
                     stats, flops, rate,
                     quality=f"top-1 {100 * float((theirs == yte.numpy()).mean()):.2f}%, agrees with ours on "
                             f"{100 * float((theirs == ours).mean()):.2f}%"))
    relative_to_ours(out)
    return out


# ---------------------------------------------------------------------------------------------- Sinkhorn


def sinkhorn_out_of_place(scores: torch.Tensor, epsilon: float, iterations: int,
                          active: torch.Tensor) -> torch.Tensor:
    """``deepclust.cluster.sinkhorn``'s arithmetic (one process) with a new tensor for every operation: its form
    before 2026-12-06, the obvious way to write it."""
    q = torch.exp((scores - scores.max()) / epsilon) * active.unsqueeze(1)
    count, k, tiny = active.sum().float(), scores.shape[1], torch.finfo(torch.float32).tiny
    for _ in range(iterations):
        q = q / (q.sum(0).clamp(min=tiny) * k)
        q = q / (q.sum(1, keepdim=True).clamp(min=tiny) * count)
    return q * count


def bench_sinkhorn(sz: dict, repeats: int, rate: float) -> list[dict[str, Any]]:
    """SwAV's codes at its CIFAR queue (3,840 rows) plus a batch, against 3,000 prototypes: memory-bound, so no
    floor. A float32 (n, K) of this size is 47.6 MB, over glibc's largest dynamic mmap threshold (32 MiB): each
    new one is a fresh mapping whose pages fault in on first write."""
    from deepclust.cluster.sinkhorn import sinkhorn

    n, k = sz["sinkhorn_rows"], sz["sinkhorn_prototypes"]
    gen = torch.Generator().manual_seed(7)
    scores = F.normalize(torch.randn(n, sz["d"], generator=gen), dim=1) @ F.normalize(
        torch.randn(k, sz["d"], generator=gen), dim=1).t()
    active = torch.ones(n, dtype=torch.bool)
    size = f"{n:,} x {k:,}, epsilon 0.05, 3 iterations"
    sinkhorn(scores[:128], 0.05, 3)
    out = []
    stats, ours = timed(lambda: sinkhorn(scores, 0.05, 3, active, across_ranks=False), repeats)
    out.append(entry("Sinkhorn codes", "deepclust.cluster.sinkhorn (in place)", size, stats, None, rate))
    stats, theirs = timed(lambda: sinkhorn_out_of_place(scores, 0.05, 3, active), repeats)
    out.append(entry("Sinkhorn codes", "the same arithmetic, a new tensor for each operation", size, stats, None,
                     rate, quality=f"equal to ours bit for bit: {torch.equal(ours, theirs)}"))
    relative_to_ours(out)
    return out


# ---------------------------------------------------------------------------------------------- data pipeline


def torchvision_pipeline():
    from torchvision.transforms import v2

    from deepclust.augment import MEAN, STD

    return v2.Compose([
        v2.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.4)], p=0.8),
        v2.RandomGrayscale(0.2),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def step_flops(step: Callable[[], Any]) -> float | None:
    """Flops of one training step (forward + backward) by torch's flop counter; None when unavailable."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def training_step(backbone_name: str, batch: int, width: int = 32) -> Callable[[], Any]:
    """One supervised-style step: backbone features -> linear -> cross-entropy, backward, SGD step."""
    from deepclust.backbones import Backbone

    torch.manual_seed(0)
    model = Backbone(backbone_name, 32, 128, False, width)
    head = torch.nn.Linear(model.feat_dim, 10)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    model.train()

    def step():
        loss = F.cross_entropy(head(model.features(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def bench_pipeline(sz: dict, repeats: int, rate: float) -> tuple[list[dict[str, Any]], list[str]]:
    from deepclust.augment import Augment

    b = sz["batch"]
    images = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    aug, gen = Augment(32), torch.Generator().manual_seed(0)
    aug(images, gen)
    out = []

    def per_second(stats: dict, n_images: int) -> dict:
        return {"images_per_s": n_images / stats["median_s"]}

    stats, _ = timed(lambda: aug(images, gen), sz["aug_repeats"])
    out.append(entry("data pipeline", "deepclust Augment, 1 view", f"uint8 {b}x3x32x32", stats, None, rate,
                     **per_second(stats, b)))
    stats, _ = timed(lambda: [aug(images, gen) for _ in range(2)], sz["aug_repeats"])
    out.append(entry("data pipeline", "deepclust Augment, 2 views", f"uint8 {b}x3x32x32", stats, None, rate,
                     **per_second(stats, b)))
    tv = torchvision_pipeline()
    torch.manual_seed(0)
    tv(images[0])
    stats, _ = timed(lambda: torch.stack([tv(img) for img in images]), sz["tv_repeats"])
    out.append(entry("data pipeline", "torchvision v2 per-image, 1 view", f"uint8 {b}x3x32x32", stats, None, rate,
                     **per_second(stats, b)))
    for name, batch, width in (("convnet", b, 32), ("resnet18_cifar", sz["resnet_batch"], 0)):
        step = training_step(name, batch, width)
        flops = step_flops(step)  # also the warm-up
        label = f"{name} width {width}" if name == "convnet" else name
        stats, _ = timed(step, repeats)
        out.append(entry("data pipeline", f"training step {label} (fwd+bwd+SGD)", f"float {batch}x3x32x32", stats,
                         flops, rate, **per_second(stats, batch)))
    # The trainer augments in the main process, in series with the step: the share of the time spent
    # augmenting, per training image, for a method with 1 or 2 views (a 2-view step sees 2B images).
    rate_of = {e["impl"]: e["images_per_s"] for e in out}
    notes = []
    for step_impl in (i for i in rate_of if i.startswith("training step")):
        for views in (1, 2):
            aug_s = 1 / rate_of[f"deepclust Augment, {views} view{'s' if views == 2 else ''}"]
            step_s = views / rate_of[step_impl]
            notes.append(f"{step_impl.removeprefix('training step ').split(' (')[0]}, {views} view(s): augmentation "
                         f"takes {100 * aug_s / (aug_s + step_s):.1f}% of augment + step time "
                         f"(at most {1 / (aug_s + step_s):,.0f} images/s)")
    return out, notes


# ---------------------------------------------------------------------------------------------- report


TODO: list[dict[str, str]] = []


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    mm = report["matmul"]
    lines = [
        f"# deepclust component benchmarks{' (--quick)' if report['quick'] else ''}",
        "",
        f"- {report['started']}, host: {report['host']}, total {report['total_wall_s']:.1f} s, "
        f"{report['repeats']} repeats (median); cores used by other processes during each part: "
        + ", ".join(f"{k} {fmt(v, 2)}" for k, v in report["other_cores"].items()),
        f"- float32 matmul {mm['n']}^3: {mm['gflops_median']:.1f} GFLOP/s median ({mm['gflops_best']:.1f} best); "
        "floor = flops / median rate",
        "",
        "| component | implementation | size | median s | min s | CPU s | GFLOP/s | floor s | x floor "
        "| time vs ours | images/s | check |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in report["results"]:
        lines.append(
            f"| {e['component']} | {e['impl']} | {e['size']} | {fmt(e['median_s'])} | {fmt(e['min_s'])} "
            f"| {fmt(e.get('cpu_median_s'))} "
            f"| {fmt(e.get('gflops_achieved'), 1)} | {fmt(e.get('floor_s'))} | {fmt(e.get('x_floor'), 2)} "
            f"| {fmt(e.get('time_vs_ours'), 2)} | {fmt(e.get('images_per_s'), 0)} | {e.get('quality', '')} |")
    for t in report["todo"]:
        lines.append(f"| {t['component']} | {t['status']} | - | - | - | - | - | - | - | - | - | {t['note']} |")
    busy = busy_note(max((v for v in report["other_cores"].values() if v is not None), default=None))
    if busy:
        lines[2:2] = [f"- **{busy}**"]
    if report["notes"]:
        lines += ["", "Data pipeline (augmentation runs in the trainer's main process, in series with the step):", ""]
        lines += [f"- {n}" for n in report["notes"]]
    if report["errors"]:
        lines += [""] + [f"FAILED: {name} ({err})" for name, err in report["errors"].items()]
    lines += ["", "time vs ours: the alternative's median time / ours (> 1: ours is faster). CPU s: median CPU time "
              "of the process, all threads (on a shared machine, with one thread, not inflated by other processes). "
              "x floor: median time / "
              "floor, where the floor is the flop count at torch's measured matmul rate (< 1: faster than torch's "
              "matmul, e.g. another BLAS). Training-step flops come from torch.utils.flop_counter (forward + "
              "backward).", ""]
    return "\n".join(lines)


def host_info() -> str:
    import faiss

    return (f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.components", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="small sizes (N=5,000, k=100, ...): well under a minute")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default 3; 2 with --quick)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--only", help="comma-separated parts to run, e.g. 'kNN graph,SCS search' (default: all)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sz = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (2 if args.quick else 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "quick": args.quick, "sizes": sz, "repeats": repeats, "host": host_info(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "load_average_start": os.getloadavg(),
        "results": [], "notes": [], "errors": {}, "todo": TODO, "other_cores": {},
    }
    print(f"matmul {sz['matmul']}^3 ...", flush=True)
    watch = CpuWatch()
    report["matmul"] = matmul_rate(sz["matmul"])
    report["other_cores"]["matmul"] = watch.other_cores()
    rate = report["matmul"]["gflops_median"]
    print(f"    {rate:.1f} GFLOP/s", flush=True)
    benches = (("k-means", bench_kmeans), ("kNN graph", bench_knn_graph), ("SCS search", bench_scs),
               ("weighted kNN eval", bench_knn_eval), ("Sinkhorn", bench_sinkhorn),
               ("data pipeline", bench_pipeline))
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        unknown = wanted - {name for name, _ in benches}
        if unknown:
            p.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(name for name, _ in benches)}")
        benches = tuple(b for b in benches if b[0] in wanted)
    for name, bench in benches:
        print(f"{name} ...", flush=True)
        t, watch = time.perf_counter(), CpuWatch()
        try:
            res = bench(sz, repeats, rate)
        except Exception as err:  # one broken component must not hide the others
            report["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"    FAILED: {report['errors'][name]}", file=sys.stderr, flush=True)
            continue
        report["other_cores"][name] = watch.other_cores()
        if isinstance(res, tuple):
            res, notes = res
            report["notes"] += notes
        report["results"] += res
        for e in res:
            print(f"    {e['impl']}: {e['median_s']:.3f} s" + (f" ({e['x_floor']:.2f}x floor)" if e["x_floor"] else ""),
                  flush=True)
        print(f"    ({time.perf_counter() - t:.1f} s)", flush=True)
    report["total_wall_s"] = time.perf_counter() - t0
    report["load_average_end"] = os.getloadavg()
    (out / "components.json").write_text(json.dumps(report, indent=1))
    (out / "components.md").write_text(markdown(report))
    print(f"wrote {out / 'components.md'}, {out / 'components.json'} ({report['total_wall_s']:.1f} s)")
    for name, err in report["errors"].items():
        print(f"FAILED: {name} ({err})", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
