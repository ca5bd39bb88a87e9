"""Supervised reference (upper bound): cross-entropy on the true labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import Backbone
from ..data import DataError
from .base import Batch, Method


class Supervised(Method):
    name = "supervised"
    eval_feature = "pooled"
    uses_labels = True

    @dataclass
    class Config:
        pass

    def __init__(self, backbone: Backbone, num_samples: int, config: Config | None = None,
                 labels: torch.Tensor | None = None):
        super().__init__(backbone, num_samples, config, labels)
        if labels is None:
            raise DataError("method 'supervised' needs labelled training data (class subfolders, "
                             "'labels' in the .npz, or a labelled torchvision source)")
        self.register_buffer("labels", labels.clone())
        self.classifier = nn.Linear(backbone.feat_dim, int(labels.max()) + 1)

    def loss(self, batch: Batch):
        logits = self.classifier(self.backbone.features(batch.views[0]))
        return F.cross_entropy(logits.float(), self.labels[batch.index]), {}
