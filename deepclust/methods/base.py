"""The method interface: how a method makes its targets and what its loss is.

The trainer calls, per epoch: ``before_epoch`` (may return the epoch's sample order, e.g. balanced
over clusters), then per batch ``loss`` and, after the optimiser step, ``after_step``; finally
``after_epoch`` returns numbers for the metrics log. All clustering state (memory banks, centroids,
labels, vote history) lives in registered buffers, so ``state_dict`` checkpoints it with the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from ..augment import Augment
from ..backbones import Backbone


@dataclass
class Batch:
    views: list[torch.Tensor]  # augmented views, each (B, 3, S, S) normalised float
    index: torch.Tensor  # (B,) sample ids on the training device
    clean: torch.Tensor | None = None  # the un-augmented images (test transform), for methods that ask
    view_rows: list[torch.Tensor | None] = field(default_factory=list)  # per view: the rows it holds (None: all)


@dataclass
class EpochContext:
    """What a method may know or ask for at an epoch boundary. Labels are for logging only."""

    round: int
    epoch: int  # within the round
    epochs: int  # per round
    rounds: int
    seed: int  # a fresh seed for this epoch (k-means, splits, ...)
    generator: torch.Generator  # CPU generator seeded for this epoch
    device: torch.device
    extract: Callable[..., torch.Tensor]  # extract("pooled" | "embedding", normalize=True) -> (N, D), eval mode
    true_labels: torch.Tensor | None = None
    reset_optimizer_state: Callable[[nn.Module], None] = lambda module: None

    @property
    def progress(self) -> float:
        """Fraction of the round done before this epoch, in [0, 1)."""
        return self.epoch / self.epochs


class Method(nn.Module):
    """Base class. Subclasses set ``name`` and a ``Config`` dataclass of their hyperparameters."""

    name: ClassVar[str] = ""
    # Augmented views per image in a batch. A method whose count changes between epochs sets ``self.views``
    # in before_epoch (PCP: 2 during its warm-up, then 1); the class value is the most it uses.
    views: int = 1
    clean_view: bool = False  # True: the trainer also passes each batch un-augmented (Batch.clean)
    eval_feature: ClassVar[str] = "embedding"  # which features the kNN protocol reads
    trains: ClassVar[bool] = True  # False for the random-init reference
    uses_labels: ClassVar[bool] = False  # only the supervised reference
    # Submodules trained at the full lr in every epoch, outside the schedule: a head re-initialised each
    # epoch (DeepCluster's) cannot fit its new targets at a decayed lr (its loss then stays at log k).
    unscheduled_modules: ClassVar[tuple[str, ...]] = ()
    # Plain attributes (numbers, lists, dicts of them) that before_epoch sets and the rest of the epoch reads:
    # a checkpoint taken inside an epoch (``checkpoint_every``) saves them beside the buffers.
    epoch_attributes: ClassVar[tuple[str, ...]] = ("stats",)

    @dataclass
    class Config:
        pass

    def __init__(self, backbone: Backbone, num_samples: int, config: Any = None,
                 labels: torch.Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        self.num_samples = num_samples
        self.config = config if config is not None else self.Config()

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups: the scheduled parameters, then those of ``unscheduled_modules`` (if any)."""
        fixed = [p for name in self.unscheduled_modules for p in getattr(self, name).parameters()]
        fixed_ids = {id(p) for p in fixed}
        groups = [{"params": [p for p in self.parameters() if id(p) not in fixed_ids], "scheduled": True}]
        return groups + ([{"params": fixed, "scheduled": False}] if fixed else [])

    def before_epoch(self, ctx: EpochContext) -> torch.Tensor | None:
        """Make targets for the epoch; return the sample order, or None for a random permutation."""
        return None

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a batch, and outputs that ``after_step`` needs."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(batch)  # the call DistributedDataParallel wraps

    def view_augment(self, view: int, augment: Augment) -> Augment:
        """The augmentation of view ``view``: the trainer's (``augment``), or another, e.g. multi-crop's small crop
        (``augment.small_crop``) for the views after a method's large ones."""
        return augment

    def view_rows(self, view: int, index: torch.Tensor, host_index: np.ndarray | None = None) -> torch.Tensor | None:
        """The rows of the batch that augmented view ``view`` is needed for (None: all of them), on the device.
        The trainer augments only those rows; ``batch.views[view]`` holds them in this order and
        ``batch.view_rows[view]`` says which they are. ``host_index`` is ``index`` on the host, so that a method
        can choose rows (and so the view's size) without reading the device."""
        return None

    def after_step(self, batch: Batch, outputs: dict[str, torch.Tensor]) -> None:
        """Update per-sample state (memory bank, labels) after the optimiser step.

        Under torchrun every rank gets the whole global batch: ``batch.index`` and each output gathered
        from all ranks in order (rows of ``outputs`` must be per sample; ``batch.views`` is then empty)."""

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        """Numbers to log for the epoch."""
        return {}

    def epoch_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.epoch_attributes if hasattr(self, name)}

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def cluster_assignments(self) -> torch.Tensor | None:
        """The method's own cluster id of every training sample (-1: none), or None when it has no
        clusters (or has not made them yet). ``deepclust cluster`` and the report read it."""
        return None
