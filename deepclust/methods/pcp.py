"""PCP, progressive cluster purification (Zhang et al.): NPID whose class of a sample is its purified
k-means cluster, with fewer and larger clusters as training goes on.

Open points, settled by reading the authors' public code (github.com/zhangyifei0115/PCP, main.py, lib/):
- k-means runs on features recomputed every epoch (an eval-mode pass, the L2-normalised 128-d embedding,
  no PCA, 20 iterations, a new seed each epoch), not on the memory bank. Their pass reused the training
  loader, so its images were augmented; ours uses the clean images, as DeepCluster's pass does here.
- CP_s's score starts at 1 for the current epoch (Eq. 2's k = 0 term) and adds alpha^a * (+-1) for each of
  the last 15 recorded epochs. They record assignments only once voting begins, so their first votes come
  15 epochs after the start; we record from epoch 0 and vote from ``vote_start``.
- Rounds after the first keep N_t at the floor (no progression) and vote from their first epoch; the
  memory bank, the network, the optimiser and the vote history carry over; the lr schedule restarts.
- The warm-up loss is t * L_pcp + (1 - t) * L_IS with t = 0.2 -> 0.5 linearly until 0.9 of the round. Their
  code repeats the warm-up in every round; the paper (and we) only in the first.
- We do not copy: the early return on a cluster of < 2 members (it left all later clusters unfiltered),
  and the rule that kept clusters of <= 5 members whole (not in the paper).
- ``gamma`` is the kept fraction (their --cluster-ratio, METHODS.md). The paper's gamma (Table II) is the
  filtered fraction, 1 - ours; the two agree at the default 0.5.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..augment import Augment
from ..cluster import cluster_count, kmeans
from ..cluster.purify import (
    cluster_anchors,
    group_purity,
    progressive_cluster_count,
    purify,
    squared_distances,
    vote_scores,
)
from ..heads import embed_crops
from ..losses import group_loss, label_positives
from .base import Batch, EpochContext
from .crops import SmallCropConfig, crop_augment, invariant_spreading_over_crops
from .npid import NPID


class PCP(NPID):
    """Each epoch: k-means with N_t clusters, CP_r keeps the ``gamma`` fraction of each cluster nearest its
    centroid, CP_s votes over past assignments; group loss over the purified cluster, instance loss for the rest."""

    name = "pcp"
    views = 2  # during the IS warm-up (plus small_crops); before_epoch sets self.views = 1 once it is over
    epoch_attributes = ("t", "views", "stats")

    @dataclass
    class Config(NPID.Config, SmallCropConfig):  # small crops: multi-crop in the warm-up's IS branch
        min_clusters: int | None = None  # N_t0, the floor of N_t; None: N / 50 (the paper's 1000 on CIFAR-10)
        progressive: bool = True  # False: N_t = the floor every epoch (Table I's DeepCluster-style row)
        kmeans_iters: int = 20
        cpr: bool = True
        gamma: float = 0.5  # CP_r: the kept fraction of each cluster, nearest its centroid
        cps: bool = True
        vote_start: float = 0.5  # fraction of the first round before CP_s starts
        vote_epochs: int = 15  # past assignments that vote
        alpha: float = 0.8  # decay of older votes
        drop_below: float = 0.0  # CP_s drops kept members scoring below this
        pull_back_at: float = 3.0  # and pulls back filtered members scoring at least this
        warmup: bool = True  # IS branch on the same network in the first round
        warmup_end: float = 0.9  # fraction of the first round
        warmup_t_start: float = 0.2  # PCP's loss weight t at the start of the warm-up ...
        warmup_t_end: float = 0.5  # ... and at its end; the IS branch gets 1 - t

    def __init__(self, backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        c = self.config
        if not 0 < c.gamma <= 1 or c.vote_epochs < 0 or not 0 < c.alpha < 1:
            raise ValueError(f"pcp: need 0 < gamma <= 1, vote_epochs >= 0 and 0 < alpha < 1; "
                             f"got {c.gamma}, {c.vote_epochs}, {c.alpha}")
        # On small data the paper's 1000 would leave clusters of a few samples: None keeps its N / 50 (logged).
        self.floor = c.min_clusters = cluster_count(c.min_clusters, num_samples, "pcp")  # the run records it
        self.register_buffer("groups", num_samples + torch.arange(num_samples))
        self.register_buffer("history", torch.full((c.vote_epochs, num_samples), -1, dtype=torch.long))
        # PCP's loss weight t (1 - t goes to the IS branch) as a device scalar the loss reads: a Python float there
        # would be a guard of compile=true's graph, recompiled each warm-up epoch as t moves. Set through ``t``.
        self.register_buffer("loss_weight", torch.ones(()), persistent=False)
        self.t = 1.0
        # Until the first epoch's targets: the memory plans count the warm-up's views.
        self.views = 2 + c.small_crops if c.warmup else 1
        self.stats: dict[str, float] = {}

    @property
    def t(self) -> float:
        return self._t

    @t.setter
    def t(self, value: float) -> None:  # also at a mid-epoch resume (an epoch attribute)
        self._t = value
        self.loss_weight.fill_(value)  # a host scalar as a kernel argument: no copy, no sync
        self.views = 2 + self.config.small_crops if value < 1 else 1  # the IS branch's views while it has weight

    def view_augment(self, view: int, augment: Augment) -> Augment:
        return crop_augment(view, augment, self.config)

    def warmup_weight(self, ctx: EpochContext) -> float:
        """t for this epoch, or 1.0 once there is no warm-up."""
        c = self.config
        end = c.warmup_end * ctx.epochs
        if not c.warmup or ctx.round > 0 or ctx.epoch >= end:
            return 1.0
        return c.warmup_t_start + (c.warmup_t_end - c.warmup_t_start) * ctx.epoch / end

    def before_epoch(self, ctx: EpochContext) -> None:
        super().before_epoch(ctx)
        c, n, t0 = self.config, self.num_samples, time.perf_counter()
        feats = ctx.extract("embedding")
        first_round = ctx.round == 0
        k = self.floor
        if c.progressive and first_round:
            k = progressive_cluster_count(ctx.epoch, ctx.epochs, n, self.floor)
        result = kmeans(feats, k, c.kmeans_iters, seed=ctx.seed)
        assignments = result.assignments
        dist = squared_distances(feats, assignments, result.centroids)
        voting = c.cps and (not first_round or ctx.epoch >= math.ceil(c.vote_start * ctx.epochs))
        scores = vote_scores(assignments, self.history, cluster_anchors(assignments, dist, k), c.alpha) \
            if voting else None
        p = purify(assignments, dist, k, c.gamma if c.cpr else None, scores, c.drop_below, c.pull_back_at)
        self.groups.copy_(p.groups)
        if c.vote_epochs:
            self.history.copy_(torch.cat((assignments.unsqueeze(0), self.history[:-1])))
        self.t = self.warmup_weight(ctx)  # and the views with it
        self.stats = {"n_clusters": k, "kept": float(p.in_cluster.float().mean()), "voting": int(voting),
                      "pulled_back": p.pulled_back, "dropped": p.dropped, "pcp_weight": self.t,
                      "cluster_time": time.perf_counter() - t0}
        if ctx.true_labels is not None and bool(p.in_cluster.any()):
            self.stats["kept_purity"] = group_purity(p.groups, ctx.true_labels, p.in_cluster)
        return None

    def positives(self, index: torch.Tensor) -> torch.Tensor:
        return label_positives(index, self.groups)

    def loss(self, batch: Batch):
        if self.views < 2:  # no IS branch: the warm-up is over (changes once a run)
            return super().loss(batch)
        z = embed_crops(self.backbone, batch.views)  # one forward per crop size: BN sees both large views, as IS
        pcp = group_loss(self.bank.logits(z[0], self.config.tau), self.positives(batch.index))
        spread = invariant_spreading_over_crops(z, self.config.tau)
        return self.loss_weight * pcp + (1 - self.loss_weight) * spread, {"embedding": z[0]}

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        return self.stats

    def cluster_assignments(self) -> torch.Tensor | None:
        """The last k-means assignment of every image; without a vote history, the purified clusters (-1: filtered)."""
        if self.config.vote_epochs and bool((self.history[0] >= 0).all()):
            return self.history[0]
        purified = self.groups < self.num_samples
        return torch.where(purified, self.groups, -1) if bool(purified.any()) else None
