"""Backbones: a trunk that gives pooled features, plus the 128-d L2-normalised embedding head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


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


class Backbone(nn.Module):
    """``features(x)``: pooled trunk features (B, feat_dim). ``forward(x)``: L2-normalised embedding."""

    def __init__(self, name: str, image_size: int = 32, embed_dim: int = 128, sobel: bool = False,
                 width: int = 32):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        self.name = name
        self.sobel = Sobel() if sobel else None
        self.trunk, self.feat_dim = BACKBONES[name](2 if sobel else 3, image_size, width)
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
