"""A trained backbone inside torchvision's detection and segmentation models, or under a multi-label head.

ResNets give their four stages (layer1..layer4, the papers' res2..res5): under an FPN (``BackboneWithFPN``,
torchvision's and Detectron2's R50-FPN) for Faster R-CNN, layer4 for FCN / DeepLabV3. The small ConvNet gives
its last block as one feature map (stride 8, 8 x width channels): Faster R-CNN then runs on that single level
with the five anchor sizes on it. Other backbones are refused, naming the ones that work.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from ..backbones import Backbone
from ..config import ConfigError
from ..data.voc import VOC_CLASSES
from .config import TransferConfig

SUPPORTED = ("resnet18", "resnet18_cifar", "resnet50", "convnet")
STAGES = ("layer1", "layer2", "layer3", "layer4")


def check_supported(backbone: Backbone, task: str) -> None:
    if backbone.name not in SUPPORTED:
        raise ConfigError(f"transfer {task} fine-tunes {', '.join(SUPPORTED)} backbones (ResNet stages under an FPN, "
                          f"the ConvNet's last block as one feature map), not {backbone.name}; train or pass a "
                          "resnet50 (the papers' detection backbone) or resnet18")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in ``module`` replaced by a FrozenBatchNorm2d with its statistics and affine (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def freeze_stages(trunk: nn.Module, trainable_layers: int) -> None:
    """torchvision's ``trainable_layers``: fine-tune the last N of layer4, layer3, layer2, layer1, conv1."""
    trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trained.append("bn1")
    for name, param in trunk.named_parameters():
        param.requires_grad_(any(name.startswith(prefix) for prefix in trained))


def dilated_resnet50(trunk: nn.Module) -> nn.Module:
    """The same ResNet-50 weights with layer3 and layer4 dilated instead of strided (output stride 8)."""
    net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    net.conv1, net.maxpool, net.fc = trunk.conv1, trunk.maxpool, nn.Identity()
    net.load_state_dict(trunk.state_dict(), strict=True)
    return net


def prepared_trunk(backbone: Backbone, cfg: TransferConfig) -> nn.Module:
    trunk = backbone.trunk
    if cfg.dilation:
        if backbone.name != "resnet50":
            raise ConfigError(f"dilation=true dilates a resnet50's layer3 and layer4 (torchvision's BasicBlock has "
                              f"no dilation); backbone {backbone.name}: set dilation=false")
        trunk = dilated_resnet50(trunk)
    if backbone.name.startswith("resnet"):
        freeze_stages(trunk, cfg.trainable_layers)
    if cfg.norm == "frozen":
        freeze_batchnorm(trunk)
    return trunk.to(memory_format=torch.contiguous_format)


class SobelInput(nn.Module):
    """A feature extractor behind the backbone's Sobel filter (a DeepCluster-style network's input)."""

    def __init__(self, sobel: nn.Module, body: nn.Module, out_channels: int):
        super().__init__()
        self.sobel, self.body, self.out_channels = sobel, body, out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.body(self.sobel(x))


def convnet_map(trunk: nn.Sequential, name: str) -> tuple[nn.Module, int]:
    """The ConvNet's last ReLU as the one feature map ``name`` (its average pool and flatten dropped)."""
    last = max(i for i, m in enumerate(trunk) if isinstance(m, nn.ReLU))
    channels = [m for m in trunk if isinstance(m, nn.Conv2d)][-1].out_channels
    return IntermediateLayerGetter(trunk, {str(last): name}), channels


def with_sobel(backbone: Backbone, body: nn.Module, channels: int) -> nn.Module:
    if backbone.sobel is None:
        body.out_channels = channels
        return body
    return SobelInput(backbone.sobel, body, channels)


def detection_model(backbone: Backbone, cfg: TransferConfig) -> FasterRCNN:
    """Faster R-CNN with 21 classes (20 + background) on the backbone: FPN over a ResNet's four stages (P2-P6, as
    torchvision's fasterrcnn_resnet50_fpn), the ConvNet's one map otherwise."""
    check_supported(backbone, "detection")
    trunk = prepared_trunk(backbone, cfg)
    common = {"num_classes": len(VOC_CLASSES) + 1, "min_size": tuple(cfg.min_size), "max_size": cfg.max_size,
              "image_mean": list(backbone.mean), "image_std": list(backbone.std),
              "box_batch_size_per_image": cfg.roi_batch_size, "rpn_post_nms_top_n_test": cfg.test_proposals,
              "rpn_pre_nms_top_n_test": cfg.test_proposals}
    if backbone.name.startswith("resnet"):
        widths = [stage_channels(trunk, s) for s in STAGES]
        fpn = BackboneWithFPN(trunk, {s: str(i) for i, s in enumerate(STAGES)}, widths, cfg.fpn_channels)
        body = fpn if backbone.sobel is None else SobelInput(backbone.sobel, fpn, fpn.out_channels)
        return FasterRCNN(body, **common)
    body, channels = convnet_map(trunk, "0")
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    return FasterRCNN(with_sobel(backbone, body, channels), rpn_anchor_generator=anchors,
                      box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), **common)


def stage_channels(trunk: nn.Module, stage: str) -> int:
    """Output channels of a ResNet stage (its last block's last conv)."""
    return [m for m in getattr(trunk, stage)[-1].modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class SegmentationModel(nn.Module):
    """torchvision's FCN / DeepLabV3 structure: the head on the last feature map, upsampled to the input."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)["out"]
        return nn.functional.interpolate(self.head(features), size=x.shape[-2:], mode="bilinear", align_corners=False)


def segmentation_model(backbone: Backbone, cfg: TransferConfig) -> SegmentationModel:
    """FCN (torchvision's FCNHead) or DeepLabV3 (its ASPP head) with 21 classes on the last feature map."""
    check_supported(backbone, "segmentation")
    trunk = prepared_trunk(backbone, cfg)
    if backbone.name.startswith("resnet"):
        body, channels = IntermediateLayerGetter(trunk, {"layer4": "out"}), stage_channels(trunk, "layer4")
    else:
        body, channels = convnet_map(trunk, "out")
    classes = len(VOC_CLASSES) + 1
    head = FCNHead(channels, classes) if cfg.model == "fcn" else DeepLabHead(channels, classes)
    return SegmentationModel(with_sobel(backbone, body, channels), head)


class MultiLabelModel(nn.Module):
    """The backbone's pooled features under one linear layer, a logit per class."""

    def __init__(self, backbone: Backbone, trunk: nn.Module, num_classes: int):
        super().__init__()
        self.sobel, self.trunk = backbone.sobel, trunk
        self.head = nn.Linear(backbone.feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(self.sobel(x) if self.sobel is not None else x))


def multilabel_model(backbone: Backbone, cfg: TransferConfig, num_classes: int) -> MultiLabelModel:
    if backbone.name.startswith("timm:"):
        raise ConfigError("transfer multilabel fine-tunes deepclust's own backbones; use eval --protocol voc-svm for "
                          f"{backbone.name}")
    trunk = backbone.trunk
    if cfg.norm == "frozen":
        freeze_batchnorm(trunk)
    return MultiLabelModel(backbone, trunk, num_classes)
