"""A training run's state: what ``train.setup`` builds and every step of ``epoch`` reads (below both, so that
neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, as_dict
from .data import ImageData
from .methods.base import Method


@dataclass
class Run:
    """Everything a training run holds; built by ``setup``, advanced by ``run_epoch``."""

    cfg: TrainConfig
    hparams: Any
    method: Method
    optimizer: torch.optim.Optimizer
    data: ImageData
    test: ImageData | None
    device: torch.device
    out: Path
    start: int = 0  # next global epoch (round * epochs + epoch)
    images: torch.Tensor | None = None  # training pixels, on the GPU when they may live there
    model: torch.nn.Module | None = None  # what computes the loss: the method, or its DDP wrapper under torchrun
    mid_epoch: dict[str, Any] | None = None  # where a checkpoint taken inside epoch ``start`` stood
    images_fit: bool = True  # the training images fit on the device beside the run (``check_device_memory``)
    amp: torch.dtype | None = None  # the autocast dtype of training and its target passes (None: float32)

    def __post_init__(self):
        self.images = self.data.images
        self.model = self.model or self.method
        if self.device.type == "cuda" and self.cfg.num_workers == 0 and torch.is_tensor(self.images) and \
                self.images_fit:  # not a cache
            self.images = self.images.to(self.device)  # uint8 on the device: augmentation never waits for the host

    @property
    def eval_feature(self) -> str:
        return self.cfg.eval_feature or self.method.eval_feature

    def payload(self, next_epoch: int) -> dict[str, Any]:
        b = self.method.backbone
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this process's GPU only: the checkpoint resumes with any number visible
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "method": self.cfg.method,
            "backbone": {"name": b.name, "image_size": self.data.image_size, "embed_dim": b.embed_dim,
                         "sobel": b.sobel is not None, "width": self.cfg.width},
            "eval_feature": self.eval_feature,
            "config": as_dict(self.cfg, self.hparams),
            "num_samples": len(self.data),
            "next_epoch": next_epoch,
            "state": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
        }
