"""Multi-crop: two large crops and small ones. What SwAV and DeepClusterV2 share (``MultiCropMethod``: the crops
through an optional projection MLP to a unit embedding, the crops of one size in one forward, as the SwAV code does),
and the small crops of the two-view instance losses (IS, PCP's warm-up) as a config key."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..augment import Augment, small_crop
from ..backbones import Backbone
from ..distributed import gather_batch_rows_at
from ..heads import ProjectionHead, embed_crops
from ..losses import invariant_spreading_loss
from .base import Method


@dataclass
class SmallCropConfig:
    small_crops: int = 0  # multi-crop: small crops besides the 2 large (SwAV: 6)
    small_crop_size: int | None = None  # None: 18/32 of the image size
    small_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])


def crop_augment(view: int, augment: Augment, config: SmallCropConfig) -> Augment:
    """View ``view``'s augmentation: the trainer's for the two large crops, multi-crop's small crop after them."""
    return augment if view < 2 else small_crop(augment, config.small_crop_size, config.small_crop_scale)


def invariant_spreading_over_crops(z: list[torch.Tensor], tau: float) -> torch.Tensor:
    """IS's loss between the two large crops' embeddings and, with multi-crop, between each small crop and each
    large one (the SwAV paper's multi-crop for an instance method, its SimCLR row), averaged over those pairs.
    Each pair's candidates are the global batch of its two crops (under torchrun, gathered from every rank)."""
    gathered = [gather_batch_rows_at(v) for v in z]
    pairs = [(0, 1)] + [(large, small) for small in range(2, len(z)) for large in (0, 1)]
    total = sum(invariant_spreading_loss(z[a], z[b], tau, gathered[a][0], gathered[b][0], gathered[a][1])
                for a, b in pairs)
    return total / len(pairs)


@dataclass
class CropConfig(SmallCropConfig):
    projector_hidden: int | None = None  # the projection MLP's width (None: the backbone's linear head)


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
        return crop_augment(view, augment, self.config)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(feats) if self.projector is not None else self.backbone.embed(feats)

    def embed_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every crop's unit embedding, in view order."""
        return embed_crops(lambda x: self.embed(self.backbone.features(x)), views)
