"""DeepClusterV2 (Caron et al. 2020, with SwAV): DeepCluster with spherical k-means on a memory of the previous
epoch's embeddings, several k's, and prototypes set to the centroids.

Before each epoch, each head h runs spherical k-means on the remembered embeddings of large crop h mod 2; its
prototypes become the centroids (fixed during the epoch) and its labels the targets. Each step, every crop's
embedding is classified against each head's prototypes (cross-entropy at temperature T), and the two large crops'
embeddings replace the samples' rows of the memory. The first head's labels are its clusters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..augment import Augment, small_crop
from ..backbones import Backbone
from ..cluster import cluster_count
from ..cluster.history import label_stats
from ..cluster.kmeans import spherical_kmeans
from ..heads import ProjectionHead, Prototypes, embed_crops
from ..losses import multi_head_cross_entropy
from .base import Batch, EpochContext, Method


class DeepClusterV2(Method):
    name = "deepclusterv2"
    views = 2  # the large crops; small_crops adds multi-crop's small ones
    eval_feature = "pooled"

    @dataclass
    class Config:
        k: int | None = None  # clusters of each head (the SwAV code's 3000 on ImageNet; None: N / 50)
        heads: int = 3  # k-means runs, each with its own prototypes and labels (the SwAV code's 3)
        temperature: float = 0.1
        kmeans_iters: int = 10
        projector_hidden: int | None = None  # the projection MLP's width (None: the backbone's linear head)
        small_crops: int = 0  # multi-crop: small crops besides the 2 large (SwAV: 6)
        small_crop_size: int | None = None  # None: 18/32 of the image size
        small_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        c = self.config
        self.views = 2 + c.small_crops
        self.ks = [cluster_count(c.k, num_samples, "deepclusterv2")] * c.heads
        self.projector = (ProjectionHead(backbone.feat_dim, c.projector_hidden, backbone.embed_dim)
                          if c.projector_hidden else None)
        self.prototypes = Prototypes(backbone.embed_dim, self.ks, learnable=False)
        # the last embedding of each sample's two large crops: the next epoch's k-means data
        self.register_buffer("memory", torch.zeros(2, num_samples, backbone.embed_dim))
        self.register_buffer("memory_filled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("assignments", torch.full((len(self.ks), num_samples), -1, dtype=torch.long))
        self.stats: dict[str, float] = {}

    def view_augment(self, view: int, augment: Augment) -> Augment:
        c = self.config
        return augment if view < 2 else small_crop(augment, c.small_crop_size, c.small_crop_scale)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(feats) if self.projector is not None else self.backbone.embed(feats)

    @torch.no_grad()
    def clean_embeddings(self, ctx: EpochContext) -> torch.Tensor:
        """Every sample's embedding of its un-augmented image, in eval mode (the memory before the first epoch,
        as the SwAV code's ``init_memory`` pass)."""
        feats = ctx.extract("pooled", normalize=False)
        was = self.training
        self.eval()
        z = torch.cat([self.embed(part) for part in feats.split(4096)])
        self.train(was)
        return z

    def before_epoch(self, ctx: EpochContext) -> None:
        t0 = time.perf_counter()
        if not bool(self.memory_filled):
            z = self.clean_embeddings(ctx).to(self.memory.device)
            self.memory.copy_(z.unsqueeze(0).expand_as(self.memory))
            self.memory_filled.fill_(True)
        previous = self.assignments[0].clone()
        for h, k in enumerate(self.ks):
            centroids, labels = spherical_kmeans(self.memory[h % 2], k, self.config.kmeans_iters, ctx.seed + h)
            self.prototypes.set_(h, centroids)
            self.assignments[h].copy_(labels)
        self.stats = {"cluster_time": time.perf_counter() - t0,
                      **label_stats(self.assignments[0], previous, self.ks[0], ctx.true_labels)}
        return None

    def loss(self, batch: Batch):
        z = embed_crops(lambda x: self.embed(self.backbone.features(x)), batch.views)
        scores = self.prototypes(torch.cat(z))
        targets = [a[batch.index] for a in self.assignments]
        loss = multi_head_cross_entropy([s / self.config.temperature for s in scores], targets, crops=len(z))
        return loss, {"embedding0": z[0].detach(), "embedding1": z[1].detach()}

    def after_step(self, batch: Batch, outputs) -> None:
        for v in (0, 1):
            self.memory[v].index_copy_(0, batch.index, F.normalize(outputs[f"embedding{v}"].float(), dim=1))

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        return self.stats

    def cluster_assignments(self) -> torch.Tensor | None:
        return self.assignments[0] if bool((self.assignments[0] >= 0).all()) else None
