"""What SwAV and DeepClusterV2 share: two large crops and multi-crop's small ones, each encoded through an optional
projection MLP to a unit embedding (the crops of one size in one forward, as the SwAV code does)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..augment import Augment, small_crop
from ..backbones import Backbone
from ..heads import ProjectionHead, embed_crops
from .base import Method


@dataclass
class CropConfig:
    projector_hidden: int | None = None  # the projection MLP's width (None: the backbone's linear head)
    small_crops: int = 0  # multi-crop: small crops besides the 2 large (SwAV: 6)
    small_crop_size: int | None = None  # None: 18/32 of the image size
    small_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])


class MultiCropMethod(Method):
    views = 2  # the large crops; small_crops adds multi-crop's small ones
    eval_feature = "pooled"

    def __init__(self, backbone: Backbone, num_samples: int, config: CropConfig | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        c = self.config
        self.views = 2 + c.small_crops
        self.projector = (ProjectionHead(backbone.feat_dim, c.projector_hidden, backbone.embed_dim)
                          if c.projector_hidden else None)

    def view_augment(self, view: int, augment: Augment) -> Augment:
        c = self.config
        return augment if view < 2 else small_crop(augment, c.small_crop_size, c.small_crop_scale)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(feats) if self.projector is not None else self.backbone.embed(feats)

    def embed_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every crop's unit embedding, in view order."""
        return embed_crops(lambda x: self.embed(self.backbone.features(x)), views)
