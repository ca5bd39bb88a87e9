"""Features of every stage of a trunk, for the per-layer linear probes of DeepCluster's, UIC's and ODC's tables.

Each stage's output is average-pooled to a fixed s x s grid with s chosen so that channels x s x s is near
``target_dim`` (the papers pool AlexNet's conv1..conv5 to about 9,000 dimensions on ImageNet; on 32 px images
the default here is 2,048, since a stage has at most 32 x 32 positions).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import test_transform
from ..backbones import Backbone
from ..runtime import native_bf16

LAYER_TARGET_DIM = 2048


def stage_modules(model: Backbone) -> dict[str, nn.Module]:
    """The module whose output is each stage: ResNet layer1..layer4 (the papers' res2..res5), VGG's five blocks
    (their max-pools), AlexNet's conv1..conv5 and the ConvNet's block1..block4 (their ReLUs); a timm model's
    stages as its ``feature_info`` names them (a ViT's blocks.0..blocks.N-1, ConvNeXt's stages.0..3)."""
    trunk = model.trunk
    if model.name.startswith("timm:"):
        return {info["module"]: trunk.get_submodule(info["module"]) for info in getattr(trunk, "feature_info", [])
                if info.get("module")}
    if model.name.startswith("resnet"):
        return {f"layer{i}": getattr(trunk, f"layer{i}") for i in range(1, 5)}
    if model.name == "vgg16_bn":
        pools = [m for m in trunk[0] if isinstance(m, nn.MaxPool2d)]
        return {f"block{i}": m for i, m in enumerate(pools, 1)}
    prefix = "conv" if model.name == "alexnet_bn" else "block"
    return {f"{prefix}{i}": m for i, m in enumerate((m for m in trunk if isinstance(m, nn.ReLU)), 1)}


def pooled_grid(channels: int, side: int, target_dim: int) -> int:
    """The side s of the pooled grid: channels x s x s near ``target_dim``, 1 <= s <= the stage's own side."""
    return max(1, min(side, round(math.sqrt(target_dim / channels))))


@torch.no_grad()
def layer_features(model: Backbone, images: torch.Tensor, layers: list[str] | None = None,
                   target_dim: int = LAYER_TARGET_DIM, device: torch.device | str = "cpu",
                   image_size: int | None = None, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """{stage: (N, C * s * s) float32} of uint8 ``images`` (test transform, eval mode), every stage by default.
    Restores the model's train/eval mode."""
    stages = stage_modules(model)
    unknown = set(layers or ()) - set(stages)
    if unknown:
        raise ValueError(f"unknown layer(s) {sorted(unknown)} of {model.name}; choose from {', '.join(stages)}")
    names = list(layers or stages)
    device = torch.device(device)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep(name: str):
        def hook(module, inputs, output):
            if output.dim() == 3:  # a transformer block's tokens (B, T, D): their average, D dimensions
                out[name].append(output.float().mean(1))
                return
            side = pooled_grid(output.shape[1], min(output.shape[-2:]), target_dim)
            out[name].append(F.adaptive_avg_pool2d(output.float(), side).flatten(1))
        return hook

    handles = [stages[name].register_forward_hook(keep(name)) for name in names]
    was_training = model.training
    model.eval()
    amp = device.type == "cuda" and native_bf16(device)
    try:
        for start in range(0, images.shape[0], batch_size):
            x = test_transform(images[start:start + batch_size].to(device), image_size or images.shape[-1],
                               model.mean, model.std)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model.features(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: torch.cat(chunks) for name, chunks in out.items()}
