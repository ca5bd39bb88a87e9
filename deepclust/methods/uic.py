"""UIC, unsupervised image classification (Chen et al. 2020): the classifier's own argmax on an augmented
view is the next epoch's pseudo-label; no embedding clustering."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import Backbone
from ..cluster import ClusteringError, balanced_indices, cluster_count, size_stats
from ..eval.clustering import nmi
from .base import Batch, EpochContext, Method


def split_empty_classes(labels: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Give every empty class a random half of the then-largest class. Returns new labels."""
    labels = labels.clone()
    counts = torch.bincount(labels, minlength=k)
    for empty in torch.nonzero(counts == 0).flatten().tolist():
        largest = int(counts.argmax())
        members = torch.nonzero(labels == largest).flatten()
        if members.numel() < 2:
            raise ClusteringError(f"cannot fill {k} classes from {labels.numel()} samples")
        moved = members[torch.randperm(members.numel(), generator=gen)[: members.numel() // 2].to(members.device)]
        labels[moved] = empty
        counts[empty], counts[largest] = moved.numel(), members.numel() - moved.numel()
    return labels


class UIC(Method):
    """Cross-entropy against labels from the previous epoch's forward pass; each step writes the argmax on
    the trained view as that sample's next label. Empty classes are split and sampling is class-balanced
    before each epoch; the classifier is never re-initialised. Optional last ``fft_epochs`` of each round
    fix the labels from a centre-crop inference and fine-tune."""

    name = "uic"
    eval_feature = "pooled"

    @dataclass
    class Config:
        k: int | None = None  # classes; None: N / 50
        fft_epochs: int = 0  # final epochs with fixed labels

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        k = self.config.k = cluster_count(self.config.k, num_samples, "uic")  # in place: the run records it
        self.classifier = nn.Linear(backbone.feat_dim, k)
        # The first epoch's uniformly random labels, from the run's seed (the trainer seeds torch with it, the same
        # on every rank) through a generator of their own, so that nothing else's draws move.
        gen = torch.Generator().manual_seed(torch.initial_seed())
        start = torch.randint(k, (num_samples,), generator=gen)
        self.register_buffer("targets", start)  # this epoch's labels
        self.register_buffer("next_targets", start.clone())  # written by this epoch's forward passes
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool))  # FFT phase: labels frozen
        self.stats: dict[str, float] = {}

    @torch.no_grad()
    def centre_crop_labels(self, ctx: EpochContext) -> torch.Tensor:
        feats = ctx.extract("pooled", normalize=False)
        was_training = self.classifier.training
        self.classifier.eval()
        labels = self.classifier(feats).argmax(1)
        self.classifier.train(was_training)
        return labels

    def before_epoch(self, ctx: EpochContext) -> torch.Tensor:
        k = self.config.k
        fft = self.config.fft_epochs > 0 and ctx.epoch >= ctx.epochs - self.config.fft_epochs
        previous = self.targets.clone()
        if fft and not bool(self.fixed):
            self.next_targets.copy_(self.centre_crop_labels(ctx))
            self.fixed.fill_(True)
        elif not fft:
            self.fixed.fill_(False)
        new = split_empty_classes(self.next_targets, k, ctx.generator)
        self.targets.copy_(new)
        self.next_targets.copy_(new)
        self.stats = {"label_change": float((new != previous).float().mean()), "fft": int(bool(self.fixed)),
                      **size_stats(new, k, "class_size")}
        if ctx.true_labels is not None:
            self.stats["nmi_labels"] = nmi(ctx.true_labels, new)
        return balanced_indices(new, self.num_samples, ctx.generator)

    def loss(self, batch: Batch):
        logits = self.classifier(self.backbone.features(batch.views[0])).float()
        return F.cross_entropy(logits, self.targets[batch.index]), {"logits": logits.detach()}

    @torch.no_grad()
    def after_step(self, batch: Batch, outputs) -> None:
        # where, not ``if bool(self.fixed)``: reading the flag would wait for the device every step
        kept = self.next_targets[batch.index]
        self.next_targets[batch.index] = torch.where(self.fixed, kept, outputs["logits"].argmax(1))

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        return self.stats

    def cluster_assignments(self) -> torch.Tensor:
        return self.next_targets  # the classifier's latest argmax for each image
