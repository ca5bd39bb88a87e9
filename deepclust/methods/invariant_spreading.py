"""IS, invariant and spreading instance features (Ye et al. 2019): two views per image in one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import gather_batch_rows_at
from ..losses import invariant_spreading_loss
from .base import Batch, Method


class InvariantSpreading(Method):
    """The other view of the same image is the positive; every other row of the 2B batch is a negative."""

    name = "is"
    views = 2

    @dataclass
    class Config:
        tau: float = 0.1

    def loss(self, batch: Batch):
        z = self.backbone(torch.cat(batch.views))  # one forward: BN sees both views together
        z1, z2 = z.chunk(2)
        (all1, offset), (all2, _) = gather_batch_rows_at(z1), gather_batch_rows_at(z2)  # the global batch
        return invariant_spreading_loss(z1, z2, self.config.tau, all1, all2, offset), {}
