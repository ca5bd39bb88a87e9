"""ODC, online deep clustering (Zhan et al. 2020): labels evolve every step through samples and centroids memories."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import Backbone
from ..cluster import class_weights, cluster_count, dissolve_small_clusters, kmeans, nearest_centroid, size_stats
from ..distributed import broadcast_, gather_batch_rows
from ..eval.clustering import nmi
from ..memory import MemoryBank
from ..runtime import allow_sync
from .base import Batch, EpochContext, Method

log = logging.getLogger(__name__)


class ODC(Method):
    """Each step: cross-entropy against labels read from the samples memory (class-reweighted), then a
    momentum update of the batch's memory features and relabelling to the nearest centroid; every
    ``centroid_interval`` steps the touched centroids are recomputed and small clusters re-split."""

    name = "odc"
    # host_step mirrors the ``step`` buffer on the host: the step loop decides when to refresh without reading
    # the device; change_sum and change_steps accumulate the per-step label change on the device.
    epoch_attributes = ("host_step", "change_sum", "change_steps")
    eval_feature = "pooled"

    @dataclass
    class Config:
        k: int | None = None  # clusters; None: N / 50 (10,000 on ImageNet in the paper)
        memory_momentum: float = 0.5  # m in F <- m f/|f| + (1 - m) F
        centroid_interval: int = 10  # steps between centroid recomputations
        min_cluster: int = 20  # clusters of this size or smaller are dissolved and re-split
        neck_hidden: int = 512
        neck_dim: int = 256
        dropout: float = 0.5
        init_iters: int = 20  # k-means iterations of the initial clustering
        # Which feature updates the memory after a step: the augmented view's, train mode (the paper), or
        # "clean": the un-augmented image's in eval mode, as the memory was initialised. On 32 px CIFAR
        # the augmented update relabels ~90% of images an epoch even for a frozen network (BENCHMARKS.md).
        memory_update: str = "augmented"
        bank_dtype: str = "float32"  # float16: the memory features in half the memory (computed in float32)
        head_momentum: float | None = None  # the classifier's SGD momentum; none: the trainer's (reference code: 0)

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        c = self.config
        c.k = cluster_count(c.k, num_samples, "odc")  # in place: the run records it
        self.clean_view = c.memory_update == "clean"
        self.min_cluster = c.min_cluster
        # Splitting the largest cluster must leave halves above the threshold: largest >= N/k > 2 t + 1.
        if 2 * c.min_cluster + 2 > num_samples / c.k:
            self.min_cluster = max(0, num_samples // (4 * c.k))
            log.warning("odc: min_cluster %d is too large for %d samples in %d clusters; using %d",
                        c.min_cluster, num_samples, c.k, self.min_cluster)
        # Neck fc-bn-relu-dropout-fc-relu, part of the method (dropped at export), not of the backbone.
        self.neck = nn.Sequential(nn.Linear(backbone.feat_dim, c.neck_hidden), nn.BatchNorm1d(c.neck_hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(c.dropout), nn.Linear(c.neck_hidden, c.neck_dim),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Linear(c.neck_dim, c.k)
        self.memory = MemoryBank(num_samples, c.neck_dim, c.memory_momentum, dtype=c.bank_dtype)
        self.register_buffer("labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(c.k, c.neck_dim))
        self.register_buffer("weights", torch.full((c.k,), 1.0 / c.k))
        self.register_buffer("touched", torch.zeros(c.k, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_start_labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.host_step = 0
        self.change_sum: torch.Tensor | float = 0.0
        self.change_steps = 0

    def param_groups(self) -> list[dict[str, Any]]:
        """The trainer's groups, with the classifier in a group of its own at ``head_momentum`` when set."""
        groups = super().param_groups()
        if self.config.head_momentum is None:
            return groups
        head = list(self.classifier.parameters())
        ids = {id(p) for p in head}
        groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in ids]
        return [groups[0], {"params": head, "scheduled": True, "momentum": self.config.head_momentum}, *groups[1:]]

    @property
    def initialised(self) -> bool:
        return bool((self.labels >= 0).all())

    @torch.no_grad()
    def initialise(self, ctx: EpochContext) -> None:
        """One global k-means on the neck features of every image fills both memories."""
        was_training = self.neck.training
        self.neck.eval()
        feats = F.normalize(self.neck(ctx.extract("pooled", normalize=False)), dim=1)
        self.neck.train(was_training)
        result = kmeans(feats, self.config.k, iters=self.config.init_iters, seed=ctx.seed)
        self.memory.fill(feats)
        self.labels.copy_(result.assignments)
        self.centroids.copy_(result.centroids)
        self.deal_with_small_clusters(ctx.seed)
        self.weights.copy_(class_weights(self.labels, self.config.k))

    def before_epoch(self, ctx: EpochContext) -> None:
        if not self.initialised:
            self.initialise(ctx)
        self.epoch_start_labels.copy_(self.labels)
        self.host_step = int(self.step)  # once an epoch: the buffer is what a checkpoint restored
        self.change_sum, self.change_steps = torch.zeros((), device=self.labels.device), 0
        return None

    def loss(self, batch: Batch):
        z = self.neck(self.backbone.features(batch.views[0]))
        logits = self.classifier(z).float()
        if self.clean_view:  # the loss trains on the augmented view; the memory sees the clean image
            was_training = self.training
            self.eval()
            with torch.no_grad():
                z_update = self.neck(self.backbone.features(batch.clean))
            self.train(was_training)
        else:
            z_update = z
        target = self.labels[batch.index]
        w = self.weights[target]
        # Weighted mean over the global batch, sum w_i l_i / sum w_i: under torchrun the trainer averages
        # per-sample means, so each rank divides by its count times the global batch's mean weight.
        mean_w = gather_batch_rows(w).mean()
        loss = (w * F.cross_entropy(logits, target, reduction="none")).sum() / (w.numel() * mean_w)
        return loss, {"neck": z_update}

    @torch.no_grad()
    def after_step(self, batch: Batch, outputs) -> None:
        index = batch.index
        self.memory.update(index, outputs["neck"])
        old = self.labels[index]
        new, _ = nearest_centroid(self.memory.rows(index), self.centroids)
        # index_fill_ takes the scalar as is; touched[old] = True would upload a 0-dim CPU tensor every step
        self.touched.index_fill_(0, old, True).index_fill_(0, new, True)
        self.labels[index] = new
        self.change_sum = self.change_sum + (old != new).float().mean()
        self.change_steps += 1
        self.step += 1
        self.host_step += 1
        if self.host_step % self.config.centroid_interval == 0:
            with allow_sync():  # which clusters are small is read on the host: one sync every interval
                self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Every ``centroid_interval`` steps: touched centroids, small clusters, loss weights.

        Under torchrun every rank computes this on its replica, and rank 0's result then overwrites all: the
        centroid sums (index_add_, atomics on a GPU) may differ in the last bits between ranks, hence the nearest
        labels and the small clusters; the repair makes no collective, and the broadcast undoes the drift."""
        self.update_centroids()
        self.deal_with_small_clusters(self.host_step)
        self.weights.copy_(class_weights(self.labels, self.config.k))
        broadcast_([self.centroids, self.labels, self.weights])

    @torch.no_grad()
    def update_centroids(self, which: torch.Tensor | None = None) -> None:
        """Recompute the touched centroids (or ``which``) as the mean memory feature of their members."""
        which = self.touched if which is None else which
        sums, counts = self.memory.class_sums(self.labels, self.config.k)
        update = (which & (counts > 0)).unsqueeze(1)  # where, not a boolean index: no size read on the host
        self.centroids.copy_(torch.where(update, sums / counts.clamp(min=1).unsqueeze(1).float(), self.centroids))
        self.touched.zero_()

    @torch.no_grad()
    def deal_with_small_clusters(self, seed: int) -> None:
        changed = dissolve_small_clusters(self.labels, self.memory.rows, self.centroids, self.min_cluster, seed)
        if changed is not None:
            self.update_centroids(changed)

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        self.refresh()  # close the epoch as an interval boundary does: no epoch ends with a small cluster
        stats = {"label_change": float((self.labels != self.epoch_start_labels).float().mean()),
                 "batch_label_change": float(self.change_sum) / max(1, self.change_steps),
                 **size_stats(self.labels, self.config.k)}
        if ctx.true_labels is not None:
            stats["nmi_labels"] = nmi(ctx.true_labels, self.labels)
        return stats

    def cluster_assignments(self) -> torch.Tensor | None:
        return self.labels if self.initialised else None
