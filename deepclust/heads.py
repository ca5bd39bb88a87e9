"""Heads the clustering methods share: unit-norm prototypes, a projection MLP, a queue of past embeddings.

SwAV, DeepClusterV2 and SeLa assemble these (with ``cluster.sinkhorn`` and ``augment.small_crop``); each holds its
state in parameters and buffers, so a checkpoint carries it and a resumed run continues exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed


class Prototypes(nn.Module):
    """Bias-free unit-norm prototype vectors, one head of ``k`` per entry of ``counts``: ``forward(z)`` gives each
    head's scores z . c (cosines for a unit z). ``learnable=False`` keeps them as buffers that the method sets
    (DeepClusterV2's centroids). ``freeze_steps``: for a learnable head, the first steps pass no gradient to the
    prototypes (SwAV: the codes of random prototypes are noise, and a moving target at the start hurts). The
    step count is a device buffer, so the choice is made on the device and a resumed run keeps it."""

    def __init__(self, dim: int, counts: list[int], learnable: bool = True, freeze_steps: int = 0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        weights = [F.normalize(torch.randn(k, dim, generator=gen), dim=1) for k in counts]
        self.counts = list(counts)
        self.learnable = learnable
        self.freeze_steps = freeze_steps
        for h, w in enumerate(weights):
            if learnable:
                self.register_parameter(f"head{h}", nn.Parameter(w))
            else:
                self.register_buffer(f"head{h}", w)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def weight(self, h: int) -> torch.Tensor:
        w = getattr(self, f"head{h}")
        if self.learnable and self.freeze_steps > 0:
            # the frozen prototypes' gradient is 0; weight decay and momentum then move them only along
            # themselves, which the renormalisation after each step undoes
            w = torch.where(self.steps < self.freeze_steps, w.detach(), w)
        return w

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [z @ self.weight(h).to(z.dtype).t() for h in range(len(self.counts))]

    @torch.no_grad()
    def normalize_(self) -> None:
        """Back onto the unit sphere (after each optimiser step), and one step more counted."""
        for h in range(len(self.counts)):
            w = getattr(self, f"head{h}")
            w.copy_(F.normalize(w, dim=1))
        self.steps.add_(1)

    @torch.no_grad()
    def set_(self, h: int, centroids: torch.Tensor) -> None:
        getattr(self, f"head{h}").copy_(F.normalize(centroids.float(), dim=1))


class ProjectionHead(nn.Module):
    """The SimCLR / SwAV projection MLP: Linear, BatchNorm, ReLU, Linear, then unit norm."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, out_dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(feats).float(), dim=1)


class EmbeddingQueue(nn.Module):
    """The last ``length`` embeddings of each of ``views`` crops (SwAV's queue): more samples for Sinkhorn's
    equal-size constraint than a small batch holds. ``push`` after each step puts the global batch's rows in
    front; ``full`` is a device flag (the queue is used only once full, as the SwAV code does); ``local_rows``
    is this rank's share of the rows, so that rows reduced across ranks count each queued sample once."""

    def __init__(self, views: int, length: int, dim: int):
        super().__init__()
        self.length = length
        self.register_buffer("rows", torch.zeros(views, length, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def full(self) -> torch.Tensor:
        return self.count >= self.length

    def local_rows(self, view: int) -> torch.Tensor:
        return self.rows[view, distributed.local_part(self.length)]

    @torch.no_grad()
    def push(self, embeddings: list[torch.Tensor]) -> None:
        n = min(embeddings[0].shape[0], self.length)
        kept = self.rows[:, : self.length - n].clone()
        for v, z in enumerate(embeddings):
            self.rows[v, :n] = z[:n].float()
            self.rows[v, n:] = kept[v]
        self.count.add_(n).clamp_(max=self.length)


def embed_crops(encode, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """``encode`` of every view, one forward per run of same-sized views (multi-crop: the large crops together,
    then the small ones, as the SwAV code does), split back into one tensor per view."""
    out: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        stop = start
        while stop < len(views) and views[stop].shape[-2:] == views[start].shape[-2:]:
            stop += 1
        out.extend(encode(torch.cat(views[start:stop])).chunk(stop - start))
        start = stop
    return out
