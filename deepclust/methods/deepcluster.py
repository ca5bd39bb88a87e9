"""DeepCluster (Caron et al. 2018): k-means pseudo-labels each epoch, re-initialised classifier, uniform sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import Backbone
from ..cluster import balanced_indices, cluster_count, kmeans, pca_whiten, size_stats
from ..eval.clustering import nmi
from .base import Batch, EpochContext, Method


def cluster_features(feats: torch.Tensor, k: int, pca_dim: int, iters: int, seed: int, pca_eps: float = 1e-5,
                     stats: dict[str, float] | None = None) -> torch.Tensor:
    """DeepCluster's clustering: PCA-whitening to min(pca_dim, d), L2 normalisation, k-means. Returns labels."""
    x = F.normalize(pca_whiten(feats, pca_dim, eps=pca_eps, stats=stats), dim=1)
    return kmeans(x, k, iters=iters, seed=seed).assignments


class DeepCluster(Method):
    """Before each epoch: cluster the pooled features of every image (eval mode, no augmentation),
    re-initialise the classifier, and sample uniformly over clusters; train with cross-entropy."""

    name = "deepcluster"
    eval_feature = "pooled"
    # The paper gives each new classifier a fresh optimiser at full lr. Its code's is momentum-free; ours keeps the
    # trainer's momentum 0.9 (reset each epoch), +1.8 kNN at the cpu profile (BENCHMARKS.md, against the authors' code).
    unscheduled_modules = ("classifier",)

    @dataclass
    class Config:
        k: int | None = None  # clusters; None: N / 50 (1000 on CIFAR-10 as the PCP paper's rerun)
        pca_dim: int = 256
        # Added to each PCA variance before whitening, in the features' units. The authors' code adds none (full
        # whitening; NaN on a dead channel). 1e-5 damps the untrained ConvNet's near-zero directions (70% of 256
        # at epoch 0, logged as pca_damped) and none of a trained one's: +1.2 kNN, within the spread (BENCHMARKS.md).
        pca_eps: float = 1e-5
        kmeans_iters: int = 20

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        self.config.k = cluster_count(self.config.k, num_samples, "deepcluster")  # in place: the run records it
        self.classifier = nn.Linear(backbone.feat_dim, self.config.k)
        self.register_buffer("assignments", torch.full((num_samples,), -1, dtype=torch.long))
        self.stats: dict[str, float] = {}

    def before_epoch(self, ctx: EpochContext) -> torch.Tensor:
        t0 = time.perf_counter()
        feats = ctx.extract("pooled", normalize=False)
        c, pca_stats = self.config, {}
        new = cluster_features(feats, c.k, c.pca_dim, c.kmeans_iters, ctx.seed, c.pca_eps, pca_stats)
        self.stats = {"cluster_time": time.perf_counter() - t0, **pca_stats, **size_stats(new, c.k)}
        if (self.assignments >= 0).all():
            self.stats["nmi_prev"] = nmi(self.assignments, new)
        if ctx.true_labels is not None:
            self.stats["nmi_labels"] = nmi(ctx.true_labels, new)
        self.assignments.copy_(new)
        # Cluster ids mean nothing across epochs: start the classifier afresh, momentum included.
        self.classifier.reset_parameters()
        ctx.reset_optimizer_state(self.classifier)
        return balanced_indices(new, self.num_samples, ctx.generator)

    def loss(self, batch: Batch):
        logits = self.classifier(self.backbone.features(batch.views[0]))
        return F.cross_entropy(logits.float(), self.assignments[batch.index]), {}

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        return self.stats

    def cluster_assignments(self) -> torch.Tensor | None:
        return self.assignments if bool((self.assignments >= 0).all()) else None
