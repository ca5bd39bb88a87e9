"""Feature passes over a whole dataset: eval mode, no augmentation."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import test_transform
from ..backbones import Backbone
from ..runtime import native_bf16

log = logging.getLogger(__name__)


def inference_trunk(model: Backbone) -> nn.Module:
    """A copy of the trunk with every conv-BN pair folded into one conv (eval mode only).

    The fold makes the feature pass about 1.7x faster on CPU here (DeepCluster runs one every epoch).
    A trunk that torch.fx cannot trace is used as it is.
    """
    from torch.fx.experimental.optimization import fuse

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.trunk.modules()):
        return model.trunk  # nothing to fold (a ViT, a ConvNeXt): a copy and a trace would cost ~1 s for nothing
    try:
        return fuse(copy.deepcopy(model.trunk).eval())
    except Exception as err:  # tracing fails on data-dependent control flow: fall back, still correct
        log.debug("conv-BN folding skipped for %s: %s", model.name, err)
        return model.trunk


def pooled_features(model: Backbone, trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trunk's pooled features of a transformed batch, through ``trunk`` (e.g. ``inference_trunk``)."""
    return trunk(model.sobel(x) if model.sobel is not None else x)


@torch.no_grad()
def extract_features(model: Backbone, images: torch.Tensor, feature: str = "embedding", batch_size: int | None = None,
                     device: torch.device | str = "cpu", image_size: int | None = None,
                     normalize: bool = True, bf16: bool | None = None) -> torch.Tensor:
    """(N, D) float32 features of uint8 ``images`` with the test transform.

    ``feature`` is "embedding" (the 128-d head output) or "pooled" (the trunk's pooled features).
    Inputs go in channels_last (NHWC), about twice as fast here on CPU; conv-BN pairs are folded.
    Batches of 128 on CPU (they stay in cache), 1024 on GPU. Restores the model's train/eval mode. The
    forward runs in bf16 autocast on a GPU with native bf16, and wherever ``bf16`` asks (a training run's target
    pass on a CPU with native bf16: 1.65x faster here); evaluation on the CPU stays float32.
    """
    if feature not in ("embedding", "pooled"):
        raise ValueError(f"feature must be 'embedding' or 'pooled', not {feature!r}")
    was_training = model.training
    model.eval()
    trunk = inference_trunk(model)
    device = torch.device(device)
    batch_size = batch_size or (1024 if device.type == "cuda" else 128)
    size = image_size or images.shape[-1]
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = test_transform(images[start:start + batch_size].to(device, non_blocking=True), size, model.mean,
                           model.std)  # the backbone's normalisation (a timm model's own)
        x = x.contiguous(memory_format=torch.channels_last)
        amp = native_bf16(device) if device.type == "cuda" and bf16 is None else bool(bf16)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            f = pooled_features(model, trunk, x)
            f = model.embed(f) if feature == "embedding" else f
        out.append(f.float())
    model.train(was_training)
    feats = torch.cat(out)
    return F.normalize(feats, dim=1) if normalize else feats
