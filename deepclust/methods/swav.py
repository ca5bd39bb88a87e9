"""SwAV, swapping assignments between views (Caron et al. 2020): online clustering against learnable prototypes.

Each step, the batch's embeddings of the two large crops are assigned to the prototypes by Sinkhorn-Knopp
(equal-sized clusters, over the batch and a queue of past embeddings), and each assignment is predicted from
every other crop's prototype scores. Its clusters are the prototypes: a sample's is its nearest prototype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..augment import Augment, small_crop
from ..backbones import Backbone
from ..cluster.history import LabelHistory
from ..cluster.sinkhorn import sinkhorn
from ..heads import EmbeddingQueue, ProjectionHead, Prototypes, embed_crops
from ..losses import swapped_prediction_loss
from .base import Batch, EpochContext, Method


class SwAV(Method):
    name = "swav"
    views = 2  # the large crops; small_crops adds multi-crop's small ones
    eval_feature = "pooled"
    epoch_attributes = ("stats", "queue_on")

    @dataclass
    class Config:
        prototypes: int = 3000  # K (the SwAV code's and solo-learn's CIFAR value)
        temperature: float = 0.1
        sinkhorn_epsilon: float = 0.05
        sinkhorn_iters: int = 3
        freeze_prototypes_steps: int = 313  # the SwAV code's ImageNet value (solo-learn CIFAR: 2 epochs)
        queue_length: int = 0  # past embeddings for Sinkhorn (0: none; solo-learn CIFAR: 3840)
        queue_start: float = 0.05  # fraction of the round before the queue fills (solo-learn: epoch 50 of 1000)
        projector_hidden: int | None = None  # the projection MLP's width (None: the backbone's linear head)
        small_crops: int = 0  # multi-crop: small crops besides the 2 large (SwAV: 6)
        small_crop_size: int | None = None  # None: 18/32 of the image size
        small_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        c = self.config
        self.views = 2 + c.small_crops
        self.projector = (ProjectionHead(backbone.feat_dim, c.projector_hidden, backbone.embed_dim)
                          if c.projector_hidden else None)
        self.prototypes = Prototypes(backbone.embed_dim, [c.prototypes], freeze_steps=c.freeze_prototypes_steps)
        self.queue = EmbeddingQueue(2, c.queue_length, backbone.embed_dim) if c.queue_length else None
        self.queue_on = False
        self.clusters = LabelHistory(num_samples)
        self.stats: dict[str, float] = {}

    def view_augment(self, view: int, augment: Augment) -> Augment:
        c = self.config
        return augment if view < 2 else small_crop(augment, c.small_crop_size, c.small_crop_scale)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(feats) if self.projector is not None else self.backbone.embed(feats)

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
        z = embed_crops(lambda x: self.embed(self.backbone.features(x)), batch.views)
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
