"""k-nearest-neighbour graphs among L2-normalised rows.

Exact (``exact_knn_graph``): the similarity matrix is symmetric, so only its blocks on and above the
diagonal are computed, half the flops of a plain search, each block feeding the top-k lists of its rows
and of its columns. On CPU a compiled scan merges a block into the lists and reads only the column groups
whose maximum (one vectorised pass) beats a row's current k-th entry; on GPU the same blocks go through
torch's top-k. Beyond ``APPROXIMATE_ABOVE`` rows on CPU the N^2 products no longer pay (about an hour at
N = 1.28M on 2 cores): a faiss inverted-file index answers instead, at a recall that
``benchmarks/components.py`` measures.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ..runtime import exact_float32

APPROXIMATE_ABOVE = 200_000  # rows; CPU only, and only when faiss is installed


def topk_by_group_max(s: torch.Tensor, k: int, groups: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``s.topk(k, dim=1)`` (values, indices; ties in any order) for a wide (B, M) matrix.

    Columns are split into ``groups`` strided slices; the element-wise maximum over the slices is one
    vectorised pass, and the k largest entries of a row lie in the k column positions with the largest
    maxima (each of those positions holds an entry at least as large as any entry outside them). Only
    k * groups candidates per row are then ranked. ``s`` may be a transposed view: the maxima are then
    taken over contiguous rows of the underlying matrix.
    """
    b, m = s.shape
    width = m // groups
    if width < 4 * k:  # narrow rows: nothing to gain
        return s.topk(k, dim=1)
    main = width * groups
    if s.stride(0) == 1 and s.stride(1) != 1:  # a transposed view: reduce over its (contiguous) columns
        maxima = s.t()[:main].reshape(groups, width, b).amax(dim=0).t()
    else:
        maxima = s[:, :main].reshape(b, groups, width).amax(dim=1)
    if main < m:  # the last m - main columns are positions of their own
        maxima = torch.cat((maxima, s[:, main:]), dim=1)
    _, pos = maxima.topk(k, dim=1)  # (B, k)
    offsets = torch.arange(groups, device=s.device) * width
    cols = pos.unsqueeze(2) + offsets  # (B, k, groups)
    tail = (pos >= width).unsqueeze(2)
    if main < m:
        cols = torch.where(tail, (pos - width + main).unsqueeze(2), cols)
    cand = s.gather(1, cols.view(b, -1)).view(b, k, groups)
    if main < m:  # a tail position is one column: keep one copy of it
        cand = cand.masked_fill(tail & (offsets > 0), float("-inf"))
    vals, j = cand.view(b, -1).topk(k, dim=1)
    return vals, cols.view(b, -1).gather(1, j)


def merge_topk(vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor) -> None:
    """Replace (in place) each row's best k of (vals, idx) by the best k of it and (new_vals, new_idx)."""
    k = vals.shape[1]
    v, j = torch.cat((vals, new_vals), dim=1).topk(k, dim=1)
    idx.copy_(torch.cat((idx, new_idx), dim=1).gather(1, j))
    vals.copy_(v)


# Explicit signatures on any-layout arrays: one compilation (cached on disk) serves full and partial blocks
# and their transposes alike, instead of one per layout met at run time.
_MERGE_SIGNATURES = [f"void({t}[:, :], {t}[:, :], int64, int64, {t}[:, :], int64[:, :])"
                     for t in ("float32", "float64")]


@numba.njit(_MERGE_SIGNATURES, cache=True, nogil=True)
def _merge_rows(s, maxima, groups, col_offset, vals, idx):  # pragma: no cover - compiled
    """For each row r of block ``s``: insert into the descending lists vals[r], idx[r] every entry larger than
    their last one. Group g (columns g, g + W, ..., W = maxima.shape[1]) is read only when maxima[r, g] beats
    the list's current last entry, which after the first few groups skips almost all of them."""
    b, m = s.shape
    width = maxima.shape[1]
    k = vals.shape[1]
    for r in range(b):
        for p in range(width + m - width * groups):
            if p < width:
                if maxima[r, p] <= vals[r, k - 1]:
                    continue
                first, step, count = p, width, groups
            else:
                first, step, count = width * groups + p - width, 1, 1
            for t in range(count):
                c = first + t * step
                v = s[r, c]
                if v > vals[r, k - 1]:
                    q = k - 1
                    while q > 0 and vals[r, q - 1] < v:
                        vals[r, q] = vals[r, q - 1]
                        idx[r, q] = idx[r, q - 1]
                        q -= 1
                    vals[r, q] = v
                    idx[r, q] = c + col_offset


def merge_block(s: torch.Tensor, col_offset: int, vals: torch.Tensor, idx: torch.Tensor, groups: int = 16,
                compiled: bool | None = None) -> None:
    """Merge the entries of block ``s`` (B, M; column c is sample c + col_offset) into the running top-k
    lists ``vals``, ``idx`` (B, k), in place. ``s`` may be a transposed view.

    ``compiled`` (default: on CPU, float32/64): the group maxima (one vectorised pass) let a compiled scan skip every
    group that cannot beat a row's current k-th entry. Otherwise (GPU): ``topk_by_group_max`` and a merge.
    """
    b, m = s.shape
    if compiled is None:
        compiled = s.device.type == "cpu" and s.dtype in (torch.float32, torch.float64)
    if not compiled:
        v, c = topk_by_group_max(s, min(vals.shape[1], m), groups)
        merge_topk(vals, idx, v, c + col_offset)
        return
    width = m // groups
    main = width * groups
    if s.stride(0) == 1 and s.stride(1) != 1:  # a transposed view: reduce over contiguous rows of s.t()
        maxima = s.t()[:main].reshape(groups, width, b).amax(dim=0).t()
    else:
        maxima = s[:, :main].reshape(b, groups, width).amax(dim=1)
    _merge_rows(s.numpy(), maxima.numpy(), groups, col_offset, vals.numpy(), idx.numpy())


@torch.no_grad()
@exact_float32()  # no TF32 in the similarities the neighbours are ranked by
def exact_knn_graph(x: torch.Tensor, k: int, exclude_self: bool = True,
                    block_elements: int | None = None,
                    compiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force cosine kNN graph of L2-normalised rows ``x`` (N, d): (similarities, indices), each (N, k).

    The similarity matrix is symmetric, so only the blocks on and above the diagonal are computed (half
    the flops of a plain search): block (I, J) gives the rows of I their candidates among J (row-wise) and
    the rows of J theirs among I (column-wise), merged into running top-k lists. Blocks of
    ``block_elements`` similarities (default 2^20 on CPU, 4 MB: they stay in cache between the product
    and the selection passes; 2^28 on GPU) reuse one buffer. ``compiled``: see ``merge_block``. Float16 rows (a
    float16 memory bank) are multiplied a block at a time in float32, so no float32 copy of ``x`` is made.
    """
    n = x.shape[0]
    if block_elements is None:
        block_elements = 2**20 if x.device.type == "cpu" else 2**28
    size = max(1, min(n, math.isqrt(block_elements)))
    dtype = torch.promote_types(x.dtype, torch.float32)
    sims = torch.full((n, k), float("-inf"), dtype=dtype, device=x.device)
    idx = torch.zeros(n, k, dtype=torch.long, device=x.device)
    buffer = torch.empty(size, size, dtype=dtype, device=x.device)  # reused: fresh pages cost 1.5x the product
    diag = torch.arange(size, device=x.device)
    for i in range(0, n, size):
        rows = x[i:i + size].to(dtype)
        for j in range(i, n, size):
            cols = x[j:j + size].to(dtype)
            s = buffer[:rows.shape[0], :cols.shape[0]]
            torch.mm(rows, cols.t(), out=s)
            if i == j and exclude_self:
                s[diag[:rows.shape[0]], diag[:rows.shape[0]]] = float("-inf")
            merge_block(s, j, sims[i:i + size], idx[i:i + size], compiled=compiled)
            if j != i:
                merge_block(s.t(), i, sims[j:j + size], idx[j:j + size], compiled=compiled)
    return sims, idx


def without_self(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k + 1 neighbours per row (an index search of the rows themselves), the k that are not the row:
    the row's own id moves last wherever the search found it, the others keep their rank."""
    is_self = idx == np.arange(len(idx))[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(sims, order, axis=1)[:, :k], np.take_along_axis(idx, order, axis=1)[:, :k]


@torch.no_grad()
def ivf_knn_graph(x: torch.Tensor, k: int, exclude_self: bool = True, nprobe: int = 16,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate cosine kNN graph by a faiss inverted-file index (4 sqrt(N) lists, ``nprobe`` searched)."""
    try:
        import faiss
    except ImportError:
        raise ImportError("the approximate kNN graph needs faiss: pip install faiss-cpu "
                          "(or pass approximate=False for the exact one)") from None
    xnp = np.ascontiguousarray(x.detach().float().cpu().numpy())
    n, d = xnp.shape
    nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))  # faiss wants >= 39 training points per list
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.max_points_per_centroid = 64  # train the lists on a 64-per-list sample: enough to route
    index.train(xnp)
    index.add(xnp)
    index.nprobe = min(nprobe, nlist)
    extra = int(exclude_self)
    sims, idx = index.search(xnp, k + extra)
    if exclude_self:
        sims, idx = without_self(sims, idx, k)
    if (idx < 0).any():
        raise RuntimeError(f"the IVF search found fewer than {k} neighbours for some rows; raise nprobe")
    return (torch.from_numpy(np.ascontiguousarray(sims)).to(x.device, x.dtype),
            torch.from_numpy(np.ascontiguousarray(idx)).to(x.device))


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def knn_graph(x: torch.Tensor, k: int, exclude_self: bool = True,
              approximate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar rows of every row of ``x`` (N, d): (similarities, indices), each (N, k),
    most similar first.

    Rows must be L2-normalised. With ``exclude_self`` a row is never its own neighbour. ``approximate``:
    None picks the faiss IVF index on CPU above ``APPROXIMATE_ABOVE`` rows when faiss is installed, and
    the exact graph otherwise; True / False force one.
    """
    n = x.shape[0]
    if k < 1 or k > n - int(exclude_self):
        raise ValueError(f"k = {k} neighbours but only {n} rows")
    if approximate is None:
        approximate = x.device.type == "cpu" and n > APPROXIMATE_ABOVE and faiss_available()
    if approximate:
        return ivf_knn_graph(x, k, exclude_self)
    return exact_knn_graph(x, k, exclude_self)
