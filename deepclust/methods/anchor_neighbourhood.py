"""AND, anchor neighbourhood discovery (Huang et al. 2019): NPID whose most confident samples, a growing
fraction each round, also count their nearest memory-bank neighbour as their own class."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import entropy, neighbour_positives
from .base import EpochContext
from .npid import NPID


@torch.no_grad()
def bank_entropy_and_nearest(bank: torch.Tensor, tau: float,
                             chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy of each row's softmax over all other bank rows (self excluded), and its nearest other row.
    A chunk of rows at a time; by default as many as keep each of the pass's (chunk, N) float32 matrices
    (logits, softmax, their product) near 256 MiB, at most 2048: ImageNet's bank would need 10 GiB each."""
    n = bank.shape[0]
    chunk = chunk or max(1, min(2048, 2**26 // max(1, n)))
    ent = torch.empty(n, device=bank.device)
    nearest = torch.empty(n, dtype=torch.long, device=bank.device)
    for start in range(0, n, chunk):
        logits = bank[start:start + chunk] @ bank.t() / tau
        rows = torch.arange(logits.shape[0], device=bank.device)
        logits[rows, rows + start] = float("-inf")
        ent[start:start + chunk] = entropy(logits)
        nearest[start:start + chunk] = logits.argmax(1)
    return ent, nearest


def select_anchors(ent: torch.Tensor, fraction: float) -> torch.Tensor:
    """Ids of the ``fraction`` of samples with the lowest entropy (the most confident)."""
    count = int(round(fraction * ent.numel()))
    return torch.argsort(ent, stable=True)[:count]


class AND(NPID):
    """Round 0 is NPID. At the start of round r >= 1 the min(1, r * anchor_step) fraction of samples with the
    lowest bank-softmax entropy become anchors; an anchor's class is itself plus its nearest neighbour."""

    name = "and"

    @dataclass
    class Config(NPID.Config):
        anchor_step: float = 0.25  # anchor fraction added per round (AND's curriculum: 25% a round)

    def __init__(self, backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        self.register_buffer("neighbours", torch.full((num_samples, 1), -1, dtype=torch.long))
        self.stats: dict[str, float] = {}

    def before_epoch(self, ctx: EpochContext) -> None:
        super().before_epoch(ctx)
        if ctx.epoch == 0 and ctx.round >= 1:
            ent, nearest = bank_entropy_and_nearest(self.bank.dense(), self.config.tau)
            anchors = select_anchors(ent, min(1.0, ctx.round * self.config.anchor_step))
            self.neighbours.fill_(-1)
            self.neighbours[anchors, 0] = nearest[anchors]
        anchors = torch.nonzero(self.neighbours[:, 0] >= 0).flatten()
        self.stats = {"anchors": int(anchors.numel())}
        if ctx.true_labels is not None and anchors.numel():
            truth = ctx.true_labels.to(anchors.device)
            same = truth[anchors] == truth[self.neighbours[anchors, 0]]
            self.stats["neighbour_precision"] = float(same.float().mean())
        return None

    def positives(self, index: torch.Tensor) -> torch.Tensor:
        return neighbour_positives(index, self.neighbours)

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        return self.stats
