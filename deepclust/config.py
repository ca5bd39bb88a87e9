"""Run configuration: one flat set of keys, trainer keys plus the method's own.

Layers, later wins: code defaults < ``configs/<method>.yaml`` < ``--config FILE`` < CLI flags < ``key=value``.
An unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
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
    labels: str | None = None  # a path,label CSV (the cluster browser's labels.csv) labelling --data's images
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
    lr_schedule: str = "step"  # step: x lr_decay at each lr_decay_at | linear: to 0 over a round (UIC) | cosine
    lr_decay_at: list[float] = field(default_factory=lambda: [0.6, 0.8])  # fractions of a round
    lr_decay: float = 0.1
    warmup_epochs: int = 0  # a linear lr warm-up over the first epochs of a round (solo-learn's SwAV: 10)
    optimizer: str = "sgd"  # sgd (the shared protocol) | lars (solo-learn's SwAV / DeepClusterV2 recipes)
    # run
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; default: the cores other jobs leave free (logged)
    amp: bool = True  # bf16 autocast where it is native: CUDA, or a CPU with AVX512-BF16 / AMX
    channels_last: bool = True  # NHWC convolutions (faster on GPU, and 1.3-2x on CPU here)
    compile: bool = False  # torch.compile the loss's forward (a GPU's step; the first epoch holds the compilation)
    progress: bool = True
    logger: str = "jsonl"  # jsonl | tensorboard (metrics.jsonl and the same scalars in OUT/tensorboard)
    init: str | None = None  # start the backbone from this file (a checkpoint, an export, a torchvision / timm file)
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
    train = TrainConfig(**{k: v for k, v in merged.items() if k in train_types})
    hparams = method_cls.Config(**{k: v for k, v in merged.items() if k in method_types})
    validate(method, train, hparams)  # defaults included; before any data is read
    return train, hparams


def number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Range:
    """Finite numbers from ``low`` to ``high``; ``ends`` says which ends are included: "[]", "[)", "(]" or "()"."""

    low: float = -math.inf
    high: float = math.inf
    ends: str = "[]"

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.ends[0] == "(" else value >= self.low
        below = value < self.high if self.ends[1] == ")" else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            if self.low == -math.inf:
                return "a finite number"
            return f"{'above' if self.ends[0] == '(' else 'at least'} {number(self.low)}"
        return f"in {self.ends[0]}{number(self.low)}, {number(self.high)}{self.ends[1]}"


def at_least(low: float) -> Range:
    return Range(low)


def above(low: float) -> Range:
    return Range(low, ends="(]")


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def __contains__(self, value: str) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return f"one of {', '.join(self.values)}"


class Device:
    """auto, or anything torch.device parses: cpu, cuda, cuda:N, mps, ..."""

    def __contains__(self, value: str) -> bool:
        import torch

        try:
            return value == "auto" or bool(torch.device(value))
        except (RuntimeError, ValueError):
            return False

    def __str__(self) -> str:
        return "auto, cpu, cuda or cuda:N"


class BackboneName:
    """One of deepclust's backbones, or timm:NAME for a model timm knows (``backbones.check_backbone_name``, which
    raises the error itself: it names the extra to install when timm is missing)."""

    def __contains__(self, value: str) -> bool:
        from .backbones import check_backbone_name

        check_backbone_name(value)
        return True

    def __str__(self) -> str:
        from .backbones import BACKBONES

        return f"one of {', '.join(BACKBONES)}, or timm:NAME"


Rule = Range | Choice | Device | BackboneName
FRACTION = Range(0, 1, "()")
LR_SCHEDULES = ("step", "linear", "cosine")
OPTIMIZERS = ("sgd", "lars")
UNIT = Range(0, 1)
# Free-form fields: the method (resolve checks it), paths (checked where they are read) and booleans (coerce).
UNCHECKED = ("method", "data", "test_data", "labels", "out", "init")


def rules(method: str) -> dict[str, Rule]:
    """The valid values of every non-boolean config field of ``method`` (TrainConfig's and its Config's)."""
    from .memory import BANK_DTYPES
    from .methods.pad import HPE_CHOICES

    table: dict[str, Rule] = {
        # TrainConfig
        "backbone": BackboneName(), "width": at_least(1), "embed_dim": at_least(1),
        "image_size": at_least(8),  # the ConvNet's and AlexNet's three 2x2 max-pools
        "subset": at_least(2), "test_subset": at_least(1), "subset_imbalance": at_least(1),
        "bad_images": Choice(("fail", "skip")), "num_workers": at_least(0), "epochs": at_least(1),
        "rounds": at_least(1), "batch_size": at_least(2),  # BatchNorm needs 2 samples a batch
        "lr": above(0), "momentum": Range(0, 1, "[)"), "weight_decay": at_least(0), "lr_decay_at": FRACTION,
        "lr_schedule": Choice(LR_SCHEDULES), "warmup_epochs": at_least(0), "optimizer": Choice(OPTIMIZERS),
        "lr_decay": Range(0, 1, "(]"), "seed": Range(0, 2**32 - 1),
        "device": Device(), "threads": at_least(1),
        "logger": Choice(("jsonl", "tensorboard")), "stop_after": at_least(1), "checkpoint_every": at_least(1),
        "nan_policy": Choice(("stop", "skip")), "eval_every": at_least(0), "knn_k": at_least(1),
        "knn_tau": above(0), "eval_feature": Choice(("embedding", "pooled")),
        # the methods' Configs: one meaning per name, but for PAD's k below
        "tau": above(0), "bank_momentum": Range(0, 1, "(]"), "bank_init": Choice(("features", "random")),
        "bank_dtype": Choice(tuple(BANK_DTYPES)), "anchor_step": UNIT,
        "k": at_least(2), "min_clusters": at_least(2),  # cluster counts; none: N / 50
        "kmeans_iters": at_least(1), "init_iters": at_least(1), "pca_dim": at_least(1), "pca_eps": above(0),
        "gamma": Range(0, 1, "(]"), "vote_start": UNIT, "vote_epochs": at_least(0), "alpha": FRACTION,
        "drop_below": Range(), "pull_back_at": Range(), "warmup_end": UNIT, "warmup_t_start": UNIT,
        "warmup_t_end": UNIT, "max_size": at_least(2), "hpe": Choice(HPE_CHOICES), "hpe_weight": at_least(0),
        "memory_momentum": Range(0, 1, "(]"), "centroid_interval": at_least(1), "min_cluster": at_least(0),
        "neck_hidden": at_least(1), "neck_dim": at_least(1), "dropout": Range(0, 1, "[)"),
        "memory_update": Choice(("augmented", "clean")), "fft_epochs": at_least(0),
        "head_momentum": Range(0, 1, "[)"),
        # SwAV, DeepClusterV2, SeLa and their shared heads
        "prototypes": at_least(2), "temperature": above(0), "sinkhorn_epsilon": above(0),
        "sinkhorn_iters": at_least(1), "freeze_prototypes_steps": at_least(0), "queue_length": at_least(0),
        "queue_start": UNIT, "projector_hidden": at_least(1), "small_crops": at_least(0),
        "small_crop_size": at_least(8), "small_crop_scale": UNIT, "heads": at_least(1),
        "sinkhorn_lambda": above(0), "label_every": at_least(1),
    }
    overrides: dict[str, dict[str, Rule]] = {"pad": {"k": at_least(1)}}  # PAD's k: kNN graph out-degree
    return {**table, **overrides.get(method, {})}


def validate(method: str, train: TrainConfig, hparams: Any) -> None:
    """Every field of both configs against ``rules``: a ConfigError naming the key, the value and what is valid."""
    table = rules(method)
    for config in (train, hparams):
        for f in dataclasses.fields(config):
            value, rule = getattr(config, f.name), table.get(f.name)
            if rule is None or value is None:  # None: allowed exactly where the type is optional (coerce)
                continue
            if isinstance(rule, Choice):
                if value not in rule:
                    raise ConfigError(f"unknown {f.name} {value!r}; choose {rule}")
            elif isinstance(value, list):
                if not all(v in rule for v in value):
                    raise ConfigError(f"every value of {f.name} must be {rule}, got {value!r}")
            elif value not in rule:
                optional = type(None) in typing.get_args(field_types(type(config))[f.name])
                raise ConfigError(f"{f.name} must be {rule}{' (or none)' if optional else ''}, got {value!r}")


def as_dict(train: TrainConfig, hparams: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(train), **dataclasses.asdict(hparams)}
