"""The keys of a ``deepclust transfer`` run: code defaults < ``--config FILE.yaml`` (configs/transfer/) < flags <
``key=value``. Schedules count iterations (Detectron2's way), not epochs."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import ConfigError

TASKS = ("detection", "segmentation", "multilabel")
MODELS = {"detection": ("faster_rcnn_fpn",), "segmentation": ("fcn", "deeplabv3"), "multilabel": ("linear",)}
NORMS = ("frozen", "batch")


@dataclass
class TransferConfig:
    task: str = "detection"
    checkpoint: str = ""  # the backbone file: a deepclust checkpoint or export, a torchvision state_dict
    backbone: str | None = None  # a plain file's backbone, where its keys do not say it
    data: str = ""  # the training split, e.g. voc2007:ROOT (trainval)
    extra_data: list[str] = field(default_factory=list)  # more training splits, e.g. [voc2012:ROOT:trainval]
    test_data: str | None = None  # default: the split that belongs with data (voc2007: test; voc2012: val)
    out: str = "runs/transfer"
    model: str | None = None  # detection: faster_rcnn_fpn; segmentation: fcn | deeplabv3; multilabel: linear
    # optimisation (Detectron2's SOLVER keys)
    iterations: int = 18000
    batch_size: int = 16
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_steps: list[int] = field(default_factory=lambda: [12000, 16000])  # lr x lr_decay at each iteration
    lr_decay: float = 0.1
    warmup_iterations: int = 100  # linear warm-up from warmup_factor x lr
    warmup_factor: float = 0.001
    # model
    norm: str = "frozen"  # the backbone's BatchNorm: frozen statistics and affine (Detectron2's default) | batch
    trainable_layers: int = 3  # ResNet stages fine-tuned, from layer4 down (3: the stem and layer1 frozen)
    fpn_channels: int = 256
    roi_batch_size: int = 512  # detection: sampled proposals per image for the box head (Detectron2's 512)
    test_proposals: int = 1000  # detection: RPN proposals per image kept at test time (Detectron2's 1000)
    dilation: bool = False  # segmentation with resnet50: layer3 and layer4 dilated (output stride 8, DeepLabV3's)
    # images
    min_size: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    test_min_size: int = 800  # detection: the shorter side at test time
    max_size: int = 1333  # detection: the longer side's cap
    image_size: int = 224  # segmentation, multilabel: square images of this size
    subset: int | None = None  # a fixed random subset of the training images
    test_subset: int | None = None  # the first N test images (a quick look; the papers' numbers use all)
    # run
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    num_workers: int = 0  # DataLoader processes decoding the training batches (0: the main process)
    log_every: int = 20
    checkpoint_every: int = 1000
    stop_after: int | None = None  # stop (checkpointed, resumable) after this many iterations
    nan_policy: str = "stop"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def convert(key: str, value: Any, kind: Any) -> Any:
    """A YAML / key=value value as ``kind`` (a dataclass field type), or a ConfigError naming the key."""
    if isinstance(value, str) and kind is not str and kind != str | None:
        value = yaml.safe_load(value) if value.strip() else None
    origin = typing.get_origin(kind)
    allowed = typing.get_args(kind) if origin in (typing.Union, types.UnionType) else (kind,)
    if value is None and type(None) in allowed:
        return None
    for option in allowed:
        if option is type(None):
            continue
        if typing.get_origin(option) is list:
            items = value if isinstance(value, list) else [value]
            inner = typing.get_args(option)[0]
            try:
                return [inner(v) for v in items]
            except (TypeError, ValueError):
                continue
        if option is bool and isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is str and isinstance(value, (str, int, float)):
            return str(value)
    raise ConfigError(f"{key}={value!r} is not a {kind}")


def resolve_transfer(layers: list[dict[str, Any]]) -> TransferConfig:
    """Merge the layers (later wins) over the defaults; unknown keys and bad values are ConfigErrors."""
    hints = typing.get_type_hints(TransferConfig)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in hints:
                raise ConfigError(f"unknown transfer key {key!r}; valid keys: {', '.join(hints)}")
            values[key] = convert(key, value, hints[key])
    cfg = TransferConfig(**values)
    check(cfg)
    return cfg


def check(cfg: TransferConfig) -> None:
    if cfg.task not in TASKS:
        raise ConfigError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    cfg.model = cfg.model or MODELS[cfg.task][0]
    if cfg.model not in MODELS[cfg.task]:
        raise ConfigError(f"model {cfg.model!r} is not one for {cfg.task}; choose one of {', '.join(MODELS[cfg.task])}")
    if not cfg.checkpoint:
        raise ConfigError("give the backbone to fine-tune: --checkpoint FILE (a deepclust checkpoint or export)")
    if not cfg.data:
        raise ConfigError("give the training data: --data voc2007:ROOT (a local VOCdevkit)")
    if cfg.norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}, not {cfg.norm!r}")
    if cfg.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"nan_policy must be stop or skip, not {cfg.nan_policy!r}")
    for key in ("iterations", "batch_size", "roi_batch_size", "test_proposals", "log_every", "checkpoint_every",
                "image_size", "test_min_size", "max_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.num_workers < 0:
        raise ConfigError(f"num_workers must be at least 0, got {cfg.num_workers}")
    if not 0 <= cfg.trainable_layers <= 5:
        raise ConfigError(f"trainable_layers must be 0-5 (ResNet stages from layer4 down), got {cfg.trainable_layers}")
    if not cfg.lr > 0 or cfg.weight_decay < 0 or cfg.warmup_iterations < 0:
        raise ConfigError("lr must be above 0, weight_decay and warmup_iterations at least 0")
    if not cfg.min_size or min(cfg.min_size) < 1:
        raise ConfigError(f"min_size must list sizes of at least 1 px, got {cfg.min_size}")
