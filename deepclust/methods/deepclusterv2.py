"""DeepClusterV2 (Caron et al. 2020, with SwAV): DeepCluster with spherical k-means on a memory of the previous
epoch's embeddings, several k's, and prototypes set to the centroids.

Before each epoch, each head h runs spherical k-means on the remembered embeddings of large crop h mod 2; its
prototypes become the centroids (fixed during the epoch) and its labels the targets. Each step, every crop's
embedding is classified against each head's prototypes (cross-entropy at temperature T), and the two large crops'
embeddings replace the samples' rows of the memory. The first head's labels are its clusters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..cluster import cluster_count
from ..cluster.history import label_stats
from ..cluster.kmeans import spherical_kmeans
from ..heads import Prototypes
from ..losses import multi_head_cross_entropy
from .base import Batch, EpochContext
from .crops import CropConfig, MultiCropMethod


class DeepClusterV2(MultiCropMethod):
    name = "deepclusterv2"

    @dataclass
    class Config(CropConfig):
        k: int | None = None  # clusters of each head (the SwAV code's 3000 on ImageNet; None: N / 50)
        heads: int = 3  # k-means runs, each with its own prototypes and labels (the SwAV code's 3)
        temperature: float = 0.1
        kmeans_iters: int = 10

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        c = self.config
        self.ks = [cluster_count(c.k, num_samples, "deepclusterv2")] * c.heads
        self.prototypes = Prototypes(backbone.embed_dim, self.ks, learnable=False)
        # the last embedding of each sample's two large crops: the next epoch's k-means data
        self.register_buffer("memory", torch.zeros(2, num_samples, backbone.embed_dim))
        self.register_buffer("memory_filled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("assignments", torch.full((len(self.ks), num_samples), -1, dtype=torch.long))
        self.stats: dict[str, float] = {}

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
        z = self.embed_views(batch.views)
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
