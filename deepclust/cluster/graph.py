"""Nearest neighbours among L2-normalised rows by chunked matrix products (no index structure needed)."""

from __future__ import annotations

import torch


@torch.no_grad()
def knn_graph(x: torch.Tensor, k: int, chunk: int = 4096,
              exclude_self: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar rows of every row of ``x`` (N, d): (similarities, indices), each (N, k).

    Rows must be L2-normalised. With ``exclude_self`` a row is never its own neighbour.
    """
    n = x.shape[0]
    if k > n - int(exclude_self):
        raise ValueError(f"k = {k} neighbours but only {n} rows")
    sims = torch.empty(n, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    xt = x.t().contiguous()
    for start in range(0, n, chunk):
        s = x[start:start + chunk] @ xt
        if exclude_self:
            rows = torch.arange(s.shape[0], device=x.device)
            s[rows, rows + start] = float("-inf")
        sims[start:start + chunk], idx[start:start + chunk] = s.topk(k, dim=1)
    return sims, idx
