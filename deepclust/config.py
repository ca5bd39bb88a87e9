"""Run configuration: one flat set of keys, trainer keys plus the method's own.

Layers, later wins: code defaults < ``configs/<method>.yaml`` < ``--config FILE`` < CLI flags < ``key=value``.
An unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message lists what is valid."""


@dataclass
class TrainConfig:
    method: str = "npid"
    data: str = "digits"
    test_data: str | None = None  # default: the split that belongs with --data (digits:test, .../test)
    out: str = "runs/run"
    # model
    backbone: str = "resnet18_cifar"
    width: int = 32  # convnet width
    embed_dim: int = 128
    sobel: bool = False
    # data
    image_size: int | None = None  # default: the source's own size
    subset: int | None = None  # a fixed random subset of the training images
    test_subset: int | None = None
    subset_imbalance: float | None = None  # a long-tailed training subset: largest / smallest class (ODC: 64)
    bad_images: str = "fail"  # fail | skip
    num_workers: int = 0
    # optimisation (METHODS.md)
    epochs: int = 200  # per round
    rounds: int = 1
    batch_size: int = 128
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_at: list[float] = field(default_factory=lambda: [0.6, 0.8])  # fractions of a round
    lr_decay: float = 0.1
    # run
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; default: the cores other jobs leave free (logged)
    amp: bool = True  # bf16 autocast where it is native: CUDA, or a CPU with AVX512-BF16 / AMX
    channels_last: bool = True  # NHWC convolutions (faster on GPU, and 1.3-2x on CPU here)
    progress: bool = True
    logger: str = "jsonl"  # jsonl | tensorboard (metrics.jsonl and the same scalars in OUT/tensorboard)
    init: str | None = None  # start the backbone from this checkpoint
    stop_after: int | None = None  # stop (checkpointed, resumable) after this many epochs in all
    checkpoint_every: int | None = None  # also checkpoint every this many steps inside an epoch (hours-long epochs)
    nan_policy: str = "stop"  # a NaN/inf loss: stop (naming where; the last checkpoint is kept) | skip the step
    # evaluation
    eval_every: int = 1  # epochs between kNN evaluations (0: only at the end)
    knn_k: int = 200
    knn_tau: float = 0.1
    eval_feature: str | None = None  # embedding | pooled; default: the method's


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(key: str, value: Any, kind: Any) -> Any:
    """Convert ``value`` (possibly a string from the command line) to the field's type."""
    args = typing.get_args(kind)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else kind
    if isinstance(value, str):
        if value.strip() in ("", "null", "~", "None", "none"):  # none: as the configs write "no cap"
            value = None
        elif base is not str:
            try:
                value = yaml.safe_load(value)  # numbers, booleans and lists as YAML writes them
            except yaml.YAMLError as err:
                raise ConfigError(f"{key}={value!r} is not valid YAML ({str(err).splitlines()[0]}); quote it or "
                                  "write it as YAML does, e.g. key=1e-3, key=true, key=[0.6, 0.8]") from None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be empty")
    try:
        if typing.get_origin(base) is list:
            (inner,) = typing.get_args(base)
            items = value if isinstance(value, (list, tuple)) else [value]
            return [scalar(inner, v) for v in items]
        return scalar(base, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(base, '__name__', base)}") from None


def scalar(kind: type, value: Any) -> Any:
    if isinstance(value, bool) != (kind is bool):  # True is an int in Python, but not an epoch count
        raise TypeError
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise TypeError
    if kind is str and not isinstance(value, str):
        raise TypeError
    return kind(value)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {pair!r}")
        out[key.strip()] = value
    return out


def resolve(layers: list[dict[str, Any]]) -> tuple[TrainConfig, Any]:
    """Merge user layers over the method's YAML and the code defaults; return (train, method) configs."""
    from .methods import METHODS

    method = TrainConfig.method
    for layer in layers:
        method = layer.get("method", method)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    method_cls = METHODS[method]
    base = read_yaml(CONFIG_DIR / f"{method}.yaml") if (CONFIG_DIR / f"{method}.yaml").is_file() else {}
    train_types = field_types(TrainConfig)
    method_types = field_types(method_cls.Config)
    valid = {**train_types, **method_types}
    merged: dict[str, Any] = {}
    for layer in [base, *layers]:
        for key, value in layer.items():
            if key not in valid:
                raise ConfigError(
                    f"unknown config key {key!r} for method {method!r}; valid keys: {', '.join(sorted(valid))}")
            merged[key] = coerce(key, value, valid[key])
    merged["method"] = method
    check_choices(merged)
    train = TrainConfig(**{k: v for k, v in merged.items() if k in train_types})
    hparams = method_cls.Config(**{k: v for k, v in merged.items() if k in method_types})
    return train, hparams


def check_choices(merged: dict[str, Any]) -> None:
    from .backbones import BACKBONES

    choices = {"backbone": tuple(BACKBONES), "bad_images": ("fail", "skip"), "nan_policy": ("stop", "skip"),
               "eval_feature": (None, "embedding", "pooled"), "logger": ("jsonl", "tensorboard"),
               "bank_dtype": ("float32", "float16"), "memory_update": ("augmented", "clean")}
    for key, valid in choices.items():
        if key in merged and merged[key] not in valid:
            raise ConfigError(f"unknown {key} {merged[key]!r}; choose one of "
                              f"{', '.join(str(v) for v in valid if v is not None)}")
    if merged.get("subset_imbalance") is not None and merged["subset_imbalance"] < 1:
        raise ConfigError(f"subset_imbalance must be at least 1 (largest / smallest class), got "
                          f"{merged['subset_imbalance']}")
    for key in ("epochs", "rounds", "batch_size", "checkpoint_every"):
        if merged.get(key) is not None and merged[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {merged[key]}")


def as_dict(train: TrainConfig, hparams: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(train), **dataclasses.asdict(hparams)}
