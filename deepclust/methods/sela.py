"""SeLa, self-labelling (Asano et al. 2020): labels for the whole dataset by optimal transport, then
cross-entropy.

At each label update (every ``label_every`` epochs) each head's logits for every sample (un-augmented, eval mode)
are turned into equal-sized labels by Sinkhorn-Knopp on P^lambda (the paper's lambda = 25, i.e. epsilon = 1 /
lambda on the logits); between updates the network learns to predict them, each head with its own classifier.
The first head's labels are its clusters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..backbones import Backbone
from ..cluster import cluster_count
from ..cluster.history import label_stats
from ..cluster.sinkhorn import sinkhorn_labels
from ..losses import multi_head_cross_entropy
from .base import Batch, EpochContext, Method


class SeLa(Method):
    name = "sela"
    eval_feature = "pooled"

    @dataclass
    class Config:
        k: int | None = None  # clusters of each head (the paper's ImageNet 3000; None: N / 50)
        heads: int = 10  # the paper's 10 heads
        sinkhorn_lambda: float = 25.0  # the paper's lambda: the labels come from P ** lambda
        sinkhorn_iters: int = 100  # a fixed count (the paper's code iterates to an error of 0.1: tens of them)
        label_every: int = 1  # epochs between label updates (the paper: 80 updates in 400 epochs)

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        c = self.config
        self.k = cluster_count(c.k, num_samples, "sela")
        self.classifiers = nn.ModuleList(nn.Linear(backbone.feat_dim, self.k) for _ in range(c.heads))
        self.register_buffer("labels", torch.full((c.heads, num_samples), -1, dtype=torch.long))
        self.stats: dict[str, float] = {}

    @torch.no_grad()
    def self_label(self, feats: torch.Tensor) -> None:
        """Each head's equal-sized labels of every sample from its logits (all rows on every rank: no collective)."""
        was = self.training
        self.eval()
        for h, head in enumerate(self.classifiers):
            logits = torch.cat([head(part.to(head.weight.device)) for part in feats.split(8192)]).float()
            self.labels[h].copy_(sinkhorn_labels(logits, self.config.sinkhorn_lambda, self.config.sinkhorn_iters))
        self.train(was)

    def before_epoch(self, ctx: EpochContext) -> None:
        global_epoch = ctx.round * ctx.epochs + ctx.epoch
        self.stats = {}
        if global_epoch % self.config.label_every == 0 or not bool((self.labels >= 0).all()):
            t0 = time.perf_counter()
            previous = self.labels[0].clone()
            self.self_label(ctx.extract("pooled", normalize=False))
            self.stats = {"cluster_time": time.perf_counter() - t0,
                          **label_stats(self.labels[0], previous, self.k, ctx.true_labels)}
        return None

    def loss(self, batch: Batch):
        feats = self.backbone.features(batch.views[0])
        logits = [head(feats) for head in self.classifiers]
        return multi_head_cross_entropy(logits, [lb[batch.index] for lb in self.labels]), {}

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        return self.stats

    def cluster_assignments(self) -> torch.Tensor | None:
        return self.labels[0] if bool((self.labels[0] >= 0).all()) else None
