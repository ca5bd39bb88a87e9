"""IS, invariant and spreading instance features (Ye et al. 2019): two views per image in one batch, and with
``small_crops`` multi-crop's small views besides them."""

from __future__ import annotations

from dataclasses import dataclass

from ..augment import Augment
from ..heads import embed_crops
from .base import Batch, Method
from .crops import SmallCropConfig, crop_augment, invariant_spreading_over_crops


class InvariantSpreading(Method):
    """The other view of the same image is the positive; every other row of the 2B batch is a negative."""

    name = "is"
    views = 2  # the large crops; small_crops adds multi-crop's small ones

    @dataclass
    class Config(SmallCropConfig):
        tau: float = 0.1

    def __init__(self, backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        self.views = 2 + self.config.small_crops

    def view_augment(self, view: int, augment: Augment) -> Augment:
        return crop_augment(view, augment, self.config)

    def loss(self, batch: Batch):
        z = embed_crops(self.backbone, batch.views)  # one forward per crop size: BN sees both large views together
        return invariant_spreading_over_crops(z, self.config.tau), {}
