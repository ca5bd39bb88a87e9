"""NPID / instance recognition (Wu et al. 2018): each image is its own class, non-parametric softmax."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones import Backbone
from ..losses import group_loss, instance_positives
from ..memory import MemoryBank
from .base import Batch, EpochContext, Method


class NPID(Method):
    """Loss -log p(i | x_i) over all N memory-bank rows; the bank is updated with momentum after each step.

    Subclasses (AND, PCP, PAD) change only ``positives``: the group G_i that counts as i's class.
    """

    name = "npid"

    @dataclass
    class Config:
        tau: float = 0.1  # softmax temperature
        bank_momentum: float = 0.5  # eta in m_i <- normalise((1 - eta) m_i + eta f_i)
        bank_init: str = "features"  # features (a feature pass before the first epoch) | random
        bank_dtype: str = "float32"  # float16: the bank in half the memory (updates and logits in float32)

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        if self.config.bank_init not in ("random", "features"):
            raise ValueError(f"bank_init must be 'random' or 'features', not {self.config.bank_init!r}")
        self.bank = MemoryBank(num_samples, backbone.embed_dim, self.config.bank_momentum,
                               dtype=self.config.bank_dtype)
        self.register_buffer("bank_filled", torch.zeros((), dtype=torch.bool))

    def before_epoch(self, ctx: EpochContext) -> None:
        if self.config.bank_init == "features" and not bool(self.bank_filled):
            self.bank.fill(ctx.extract("embedding"))
        self.bank_filled.fill_(True)
        return None

    def positives(self, index: torch.Tensor) -> torch.Tensor:
        return instance_positives(index, self.num_samples)

    def loss(self, batch: Batch):
        z = self.backbone(batch.views[0])
        logits = self.bank.logits(z, self.config.tau)
        return group_loss(logits, self.positives(batch.index)), {"embedding": z}

    def after_step(self, batch: Batch, outputs) -> None:
        self.bank.update(batch.index, outputs["embedding"])
