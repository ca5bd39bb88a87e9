"""SwAV, swapping assignments between views (Caron et al. 2020): online clustering against learnable prototypes.

Each step, the batch's embeddings of the two large crops are assigned to the prototypes by Sinkhorn-Knopp
(equal-sized clusters, over the batch and a queue of past embeddings), and each assignment is predicted from
every other crop's prototype scores. Its clusters are the prototypes: a sample's is its nearest prototype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones import Backbone
from ..cluster.history import LabelHistory
from ..cluster.sinkhorn import sinkhorn
from ..heads import EmbeddingQueue, Prototypes
from ..losses import swapped_prediction_loss
from .base import Batch, EpochContext
from .crops import CropConfig, MultiCropMethod


class SwAV(MultiCropMethod):
    name = "swav"
    epoch_attributes = ("stats", "queue_on")

    @dataclass
    class Config(CropConfig):
        prototypes: int = 3000  # K (the SwAV code's and solo-learn's CIFAR value)
        temperature: float = 0.1
        sinkhorn_epsilon: float = 0.05
        sinkhorn_iters: int = 3
        freeze_prototypes_steps: int = 313  # the SwAV code's ImageNet value (solo-learn CIFAR: 2 epochs)
        queue_length: int = 0  # past embeddings for Sinkhorn (0: none; solo-learn CIFAR: 3840)
        queue_start: float = 0.05  # fraction of the round before the queue fills (solo-learn: epoch 50 of 1000)

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        c = self.config
        self.prototypes = Prototypes(backbone.embed_dim, [c.prototypes], freeze_steps=c.freeze_prototypes_steps)
        self.queue = EmbeddingQueue(2, c.queue_length, backbone.embed_dim) if c.queue_length else None
        self.queue_on = False
        self.clusters = LabelHistory(num_samples)
        self.stats: dict[str, float] = {}

    def before_epoch(self, ctx: EpochContext) -> None:
        self.queue_on = self.queue is not None and ctx.progress >= self.config.queue_start
        self.stats = {}
        return None

    def codes(self, scores: torch.Tensor, view: int) -> torch.Tensor:
        """Sinkhorn codes of this batch's crop ``view``, with the queue's rows once it is full."""
        c = self.config
        if not self.queue_on:
            return sinkhorn(scores.detach(), c.sinkhorn_epsilon, c.sinkhorn_iters)
        queued = self.queue.local_rows(view)
        both = torch.cat((self.prototypes(queued)[0].detach().float(), scores.detach().float()))
        active = torch.cat((self.queue.full().expand(queued.shape[0]),
                            torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)))
        return sinkhorn(both, c.sinkhorn_epsilon, c.sinkhorn_iters, active)[queued.shape[0]:]

    def loss(self, batch: Batch):
        z = self.embed_views(batch.views)
        scores = [self.prototypes(zv)[0] for zv in z]
        codes = [self.codes(scores[v], v) for v in (0, 1)]
        loss = swapped_prediction_loss(scores, codes, self.config.temperature)
        return loss, {"embedding0": z[0].detach(), "embedding1": z[1].detach(),
                      "cluster": scores[0].detach().argmax(1)}

    def after_step(self, batch: Batch, outputs) -> None:
        self.prototypes.normalize_()
        if self.queue_on:
            self.queue.push([outputs["embedding0"], outputs["embedding1"]])
        self.clusters.record(batch.index, outputs["cluster"])

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        return {**self.stats, **self.clusters.epoch_stats(self.config.prototypes, ctx.true_labels)}

    def cluster_assignments(self) -> torch.Tensor | None:
        return self.clusters.assignments()
