"""Backbones: a trunk that gives pooled features, plus the 128-d L2-normalised embedding head."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .augment import MEAN, STD
from .config import ConfigError

TIMM_PREFIX = "timm:"  # --backbone timm:NAME: any model timm builds, e.g. timm:vit_small_patch16_224
TIMM_EXTRA = "pip install 'deepclust[timm]'"


class Sobel(nn.Module):
    """Fixed grayscale + Sobel filtering (DeepCluster's input option): 3 channels in, 2 out."""

    def __init__(self):
        super().__init__()
        gx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
        kernel = torch.stack((gx, gx.t())).unsqueeze(1)  # (2,1,3,3)
        self.register_buffer("kernel", kernel, persistent=False)
        self.register_buffer("luma", torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = (x * self.luma).sum(1, keepdim=True)
        return F.conv2d(g, self.kernel, padding=1)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def convnet(in_ch: int, image_size: int, width: int = 32) -> tuple[nn.Module, int]:
    """Small 4-layer ConvNet for CPU runs: widths w, 2w, 4w, 8w, max-pool after the first three."""
    layers: list[nn.Module] = []
    cin = in_ch
    for i, mult in enumerate((1, 2, 4, 8)):
        layers += conv_bn(cin, width * mult)
        if i < 3:
            layers.append(nn.MaxPool2d(2))
        cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), cin


def alexnet_bn(in_ch: int, image_size: int, width: int = 0) -> tuple[nn.Module, int]:
    """The papers' AlexNet: conv 96-256-384-384-256 with BN, no LRN. A 3x3 stride-1 stem below 64 px."""
    small = image_size < 64
    stem = conv_bn(in_ch, 96, 3, 1, 1) if small else conv_bn(in_ch, 96, 11, 4, 2)
    pool = (lambda: nn.MaxPool2d(2)) if small else (lambda: nn.MaxPool2d(3, 2))
    layers = [*stem, pool(), *conv_bn(96, 256, 5, 1, 2), pool(), *conv_bn(256, 384), *conv_bn(384, 384),
              *conv_bn(384, 256), pool(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 256


def resnet(depth: int, in_ch: int, image_size: int, cifar_stem: bool) -> tuple[nn.Module, int]:
    net = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth](weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_ch != 3:
        net.conv1 = nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def resnet18_cifar(in_ch: int, image_size: int, width: int = 0) -> tuple[nn.Module, int]:
    return resnet(18, in_ch, image_size, cifar_stem=True)


def resnet18(in_ch: int, image_size: int, width: int = 0) -> tuple[nn.Module, int]:
    """torchvision's resnet18: its ImageNet 7x7 stem + max-pool from 64 px, the CIFAR stem below (as resnet50),
    so ImageNet-trained resnet18 files load (``--init``, ``--checkpoint``) at image sizes >= 64."""
    return resnet(18, in_ch, image_size, cifar_stem=image_size < 64)


def resnet50(in_ch: int, image_size: int, width: int = 0) -> tuple[nn.Module, int]:
    return resnet(50, in_ch, image_size, cifar_stem=image_size < 64)


def vgg16_bn(in_ch: int, image_size: int, width: int = 0) -> tuple[nn.Module, int]:
    net = torchvision.models.vgg16_bn(weights=None)
    if in_ch != 3:
        net.features[0] = nn.Conv2d(in_ch, 64, 3, 1, 1)
    return nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 512


BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg16_bn": vgg16_bn,
    "alexnet_bn": alexnet_bn,
    "convnet": convnet,
}


def import_timm(name: str = "timm:NAME") -> ModuleType:
    """timm, or a ConfigError naming the extra that installs it (timm is optional)."""
    try:
        import timm
    except ImportError as err:
        raise ConfigError(f"backbone {name} needs timm, which is not installed: {TIMM_EXTRA} "
                          "(or pip install timm)") from err
    return timm


def timm_name(name: str) -> str | None:
    """The timm model name of a ``timm:NAME`` backbone (a pretrained tag kept: its normalisation is the tag's);
    None for deepclust's own backbones."""
    return name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else None


def check_backbone_name(name: str) -> None:
    """A ConfigError unless ``name`` is one of BACKBONES or ``timm:NAME`` with a model timm knows."""
    model = timm_name(name)
    if model is None:
        if name not in BACKBONES:
            raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}, or timm:NAME "
                              "(any timm model, e.g. timm:vit_small_patch16_224)")
        return
    if not import_timm(name).is_model(model):
        raise ConfigError(f"unknown backbone {name!r}: timm has no model {model!r}; choose one of "
                          f"{', '.join(BACKBONES)}, or timm:NAME with a name timm.list_models() gives, e.g. "
                          "timm:vit_small_patch16_224, timm:convnext_atto, timm:resnet50")


def timm_build_kwargs(timm: ModuleType, model: str, in_ch: int, image_size: int) -> dict:
    """create_model's arguments: no download, no classifier (the pooled features), ``img_size`` where the
    model is built for one input size (ViTs: its position embeddings are made for that grid). A ViT also takes
    other sizes (``dynamic_img_size``, ``dynamic_img_pad``: multi-crop's small crops, whose size its patches
    need not tile); at ``image_size`` its forward is exactly the static model's."""
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": in_ch}
    with torch.device("meta"):  # no weights allocated or initialised
        probe = timm.create_model(model, **kwargs)
    accepts = inspect.signature(type(probe).__init__).parameters
    if "img_size" in accepts:
        kwargs["img_size"] = image_size
    kwargs.update({key: True for key in ("dynamic_img_size", "dynamic_img_pad") if key in accepts})
    return kwargs


def check_timm_size(timm: ModuleType, model: str, kwargs: dict, image_size: int) -> None:
    """Refuse, naming the fix, an image size the model cannot take: one its patches do not tile (which timm
    would crop silently), or one its forward fails on (tried on the meta device: no memory, no time)."""
    with torch.device("meta"):
        probe = timm.create_model(model, **kwargs)
    default = probe.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
    if patch is not None and image_size % patch[0]:
        low, high = image_size // patch[0] * patch[0], (image_size // patch[0] + 1) * patch[0]
        raise ConfigError(f"backbone timm:{model} cuts images into {patch[0]}x{patch[0]} patches, which "
                          f"{image_size} px images do not tile: use image_size={high}"
                          + (f" or {low}" if low else "") + f" (--image-size for eval, embed, cluster; its "
                          f"default is {default})")
    try:
        with torch.device("meta"):
            probe.eval()(torch.empty(1, kwargs["in_chans"], image_size, image_size))
    except Exception as err:  # too small for its strides, a window size it needs, ...
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        stride = max((info.get("reduction", 0) for info in getattr(probe, "feature_info", [])), default=0)
        fix = f"at least {stride} (its total stride), or " if image_size < stride else ""
        raise ConfigError(f"backbone timm:{model} cannot take {image_size} px images ({first}): use an image_size "
                          f"{fix}its default {default} (--image-size for eval, embed, cluster)") from None


def timm_trunk(name: str, in_ch: int, image_size: int) -> nn.Module:
    """timm's model ``timm:NAME`` with no classifier (its forward: the pooled features, class token or average
    as the model defines), random weights, for ``image_size`` px inputs."""
    model = timm_name(name)
    check_backbone_name(name)
    timm = import_timm(name)
    kwargs = timm_build_kwargs(timm, model, in_ch, image_size)
    check_timm_size(timm, model, kwargs, image_size)
    return timm.create_model(model, **kwargs)


def check_input_size(name: str, image_size: int, sobel: bool = False) -> None:
    """A ConfigError, naming the fix, when backbone ``name`` (a timm one) cannot take ``image_size`` px images;
    deepclust's own backbones take any size from 8 px."""
    model = timm_name(name)
    if model is None:
        return
    timm = import_timm(name)
    check_timm_size(timm, model, timm_build_kwargs(timm, model, 2 if sobel else 3, image_size), image_size)


def timm_default_size(name: str) -> int:
    """The input size a timm model is made for (its config's; 224 where it names none)."""
    timm = import_timm(name)
    with torch.device("meta"):
        probe = timm.create_model(timm_name(name), pretrained=False, num_classes=0)
    return int(probe.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def build_trunk(name: str, in_ch: int, image_size: int, width: int = 32) -> tuple[nn.Module, int]:
    """The trunk of backbone ``name`` (one of BACKBONES or timm:NAME) and its pooled feature size."""
    if timm_name(name) is not None:
        trunk = timm_trunk(name, in_ch, image_size)
        return trunk, trunk.num_features
    check_backbone_name(name)
    return BACKBONES[name](in_ch, image_size, width)


def normalization(trunk: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the trunk's inputs are normalised with: a timm model's own (its config: 0.5 for many
    ViTs, CLIP's for CLIP towers), ImageNet's for deepclust's backbones."""
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", MEAN)), tuple(cfg.get("std", STD))


class Backbone(nn.Module):
    """``features(x)``: pooled trunk features (B, feat_dim). ``forward(x)``: L2-normalised embedding.
    ``mean`` / ``std``: the normalisation its inputs take (augmentation, features and evaluation use it)."""

    def __init__(self, name: str, image_size: int = 32, embed_dim: int = 128, sobel: bool = False,
                 width: int = 32):
        super().__init__()
        self.name = name
        self.sobel = Sobel() if sobel else None
        self.trunk, self.feat_dim = build_trunk(name, 2 if sobel else 3, image_size, width)
        self.mean, self.std = normalization(self.trunk)
        self.embed_dim = embed_dim
        self.head = nn.Linear(self.feat_dim, embed_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.sobel is not None:
            x = self.sobel(x)
        return self.trunk(x)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(feats).float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))
