"""The evaluation protocols on one backbone, as the CLI and the benchmarks run them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..backbones import Backbone
from ..config import ConfigError
from ..data import DataError, ImageData
from .clustering import cluster_metrics
from .features import extract_features
from .fewshot import fewshot_accuracy
from .knn import knn_accuracy
from .layers import LAYER_TARGET_DIM, layer_features
from .linear import linear_probe
from .linear_sgd import sgd_linear_probe
from .lowshot import LOWSHOT_DRAWS, LOWSHOT_SHOTS, fillable_shots, lowshot_svm

PROTOCOLS = ("knn", "linear", "cluster", "fewshot", "lowshot")
CLUSTER_ON = ("test", "train+test")
PROBES = ("fast", "sgd")


def score_layers(model: Backbone, train: ImageData, test: ImageData, layers: tuple[str, ...], layer_dim: int,
                 device: torch.device | None, size: int | None, key: str,
                 score: Callable[[torch.Tensor, torch.Tensor], float]) -> dict[str, Any]:
    """A protocol on each stage's pooled features (``layers``: names, or ``("all",)``): ``score(train, test)``
    as ``KEY_<stage>``, and each stage's dimension as ``layer_dims``. A stage the backbone lacks: ConfigError."""
    names = None if tuple(layers) == ("all",) else list(layers)
    try:
        train_layers, test_layers = (layer_features(model, d.images, names, layer_dim, device, size)
                                     for d in (train, test))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    out: dict[str, Any] = {"layer_dims": {name: f.shape[1] for name, f in train_layers.items()}}
    for name, f in train_layers.items():
        out[f"{key}_{name}"] = score(f, test_layers[name])
    return out


def evaluate_backbone(model: Backbone, train: ImageData, test: ImageData, feature: str,
                      protocols: tuple[str, ...] = PROTOCOLS, device: torch.device | str = "cpu",
                      knn_k: int = 200, knn_tau: float = 0.1, cluster_on: str = "test", fewshot_ways: int = 5,
                      fewshot_shots: tuple[int, ...] = (1, 5), fewshot_queries: int = 15,
                      fewshot_episodes: int = 600, seed: int = 0, layers: tuple[str, ...] = (),
                      layer_dim: int = LAYER_TARGET_DIM, probe: str = "fast", probe_epochs: int = 32,
                      lowshot_shots: tuple[int, ...] = LOWSHOT_SHOTS, lowshot_draws: int = LOWSHOT_DRAWS,
                      svm_cost: float = 1.0) -> dict[str, Any]:
    """kNN top-1 (``feature``, k, tau), linear top-1 (pooled, frozen; ``probe`` "fast": L-BFGS on the cached
    features, "sgd": the papers' SGD on augmented crops for ``probe_epochs``), clustering NMI/ARI/accuracy
    (k-means with the true class count on the ``feature`` of the test images, or with ``cluster_on =
    "train+test"`` of training and test images together, the clustering papers' protocol as in PAD's
    Table 2), few-shot accuracy (episodes drawn from the test images' ``feature``, ways capped at the
    test classes; ``fewshot_{N}way_{K}shot`` and its ``_ci95``) and ODC's low-shot SVMs on the pooled
    features (``lowshot_map_{n}shot``, its ``_std`` over ``lowshot_draws`` draws, and ``lowshot_map`` over all
    n), whichever ``protocols`` asks for;
    ``("all",)`` runs each one the data allows and lists the others under ``skipped``. With ``layers``
    (stage names, or ``("all",)``) the linear protocol also probes each stage's features pooled to about
    ``layer_dim`` dimensions (``linear_top1_<stage>``, always with the fast probe; the dimensions under
    ``layer_dims``)."""
    strict = protocols != ("all",)  # "all": every protocol the data allows; the others are listed as skipped
    protocols = PROTOCOLS if not strict else protocols
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {', '.join(PROTOCOLS)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")
    if cluster_on not in CLUSTER_ON:
        raise ValueError(f"unknown cluster_on {cluster_on!r}; choose from {', '.join(CLUSTER_ON)}")
    if train.labels is None or test.labels is None:
        raise DataError("evaluation needs labelled train and test data (class subfolders or 'labels')")
    size = train.image_size
    out: dict[str, Any] = {}
    cache: dict[tuple[int, str, bool], torch.Tensor] = {}

    def feats(data: ImageData, kind: str, normalize: bool = True) -> torch.Tensor:
        key = (id(data), kind, normalize)
        if key not in cache:  # the linear and low-shot protocols share the pooled features
            cache[key] = extract_features(model, data.images, kind, device=device, image_size=size,
                                          normalize=normalize)
        return cache[key]

    classes = max(train.num_classes, test.num_classes)  # from the host labels, before they move to the device
    ytr, yte = train.labels.to(device), test.labels.to(device)
    test_feats = feats(test, feature) if {"knn", "cluster", "fewshot"} & set(protocols) else None
    if "knn" in protocols:
        out["knn_top1"] = knn_accuracy(test_feats, yte, feats(train, feature), ytr, knn_k, knn_tau)
    if "linear" in protocols and probe == "sgd":
        out["linear_top1"] = sgd_linear_probe(model, train.images, ytr, test.images, yte, probe_epochs,
                                              device=device, image_size=size, seed=seed)
    elif "linear" in protocols:
        out["linear_top1"] = linear_probe(feats(train, "pooled", False), ytr, feats(test, "pooled", False), yte,
                                          num_classes=classes)
    if "linear" in protocols and layers:
        out.update(score_layers(model, train, test, layers, layer_dim, device, size, "linear_top1",
                                lambda ftr, fte: linear_probe(ftr, ytr, fte, yte, num_classes=classes)))
    if "cluster" in protocols and cluster_on == "train+test":
        out.update(cluster_metrics(torch.cat((feats(train, feature), test_feats)), torch.cat((ytr, yte))))
    elif "cluster" in protocols:
        out.update(cluster_metrics(test_feats, yte))
    if "fewshot" in protocols:
        ways = min(fewshot_ways, int(yte.unique().numel()))
        for shots in fewshot_shots:
            try:
                score = fewshot_accuracy(test_feats, yte, ways, shots, fewshot_queries, fewshot_episodes, seed)
            except ValueError as err:
                if strict:
                    raise DataError(f"few-shot on {test.name}: {err}") from err
                out.setdefault("skipped", []).append(f"fewshot {shots}-shot: {err}")
                continue
            out[f"fewshot_{ways}way_{shots}shot"], out[f"fewshot_{ways}way_{shots}shot_ci95"] = score.values()
    if "lowshot" in protocols:
        shots = tuple(lowshot_shots) if strict else fillable_shots(ytr, tuple(lowshot_shots))
        if len(shots) < len(lowshot_shots):
            out.setdefault("skipped", []).append(f"lowshot {sorted(set(lowshot_shots) - set(shots))} shots: a "
                                                 f"class of {train.name} has fewer training images")
        try:
            if shots:
                out.update(lowshot_svm(feats(train, "pooled", False), ytr, feats(test, "pooled", False), yte,
                                       shots, lowshot_draws, svm_cost, seed))
        except ValueError as err:
            if strict:
                raise DataError(f"low-shot SVMs on {train.name}: {err}") from err
            out.setdefault("skipped", []).append(f"lowshot: {err}")
    return out
