"""``deepclust eval --protocol voc-svm``: ODC's VOC07 SVM classification protocol (``eval.voc_svm``) on a
VOC split (``voc2007:ROOT``: trainval to train, test to score) or any labelled data (one class an image)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..config import ConfigError
from ..data import DataError, ImageData, VOCImageData
from ..eval import extract_features
from ..eval.protocols import score_layers
from ..eval.voc_svm import VOC_SVM_COSTS, one_hot_targets, voc_svm
from .evaluate import open_model_and_splits, print_result


def multi_labels(data: ImageData, num_classes: int | None = None) -> torch.Tensor:
    """(N, C) targets of a VOC split, or of single-label data as one-hot; unlabelled data is a DataError."""
    if isinstance(data, VOCImageData) and data.targets is not None:
        return data.targets
    if data.labels is None:
        raise DataError(f"{data.name} has no labels: the voc-svm protocol needs VOC's multi-labels "
                        "(--data voc2007:ROOT) or labelled data (class subfolders, 'labels')")
    return one_hot_targets(data.labels, num_classes or data.num_classes)


def evaluate_voc_svm(model: Any, train: ImageData, test: ImageData, device: torch.device, seed: int = 0,
                     layers: tuple[str, ...] = (), layer_dim: int = 2048,
                     costs: tuple[float, ...] = VOC_SVM_COSTS) -> dict[str, Any]:
    """The protocol on the pooled features, and with ``layers`` on each stage's (``voc_svm_map_<stage>``)."""
    classes = max(train.num_classes or 0, test.num_classes or 0) or None
    ytr, yte = multi_labels(train, classes), multi_labels(test, classes)
    names = train.classes if train.classes and len(train.classes) == ytr.shape[1] else None
    size = train.image_size
    out: dict[str, Any] = {}
    try:
        feats = [extract_features(model, d.images, "pooled", device=device, image_size=size, normalize=False)
                 for d in (train, test)]
        out.update(voc_svm(feats[0], ytr, feats[1], yte, costs, seed, names))
        if layers:
            out.update(score_layers(model, train, test, layers, layer_dim, device, size, "voc_svm_map",
                                    lambda ftr, fte: voc_svm(ftr, ytr, fte, yte, costs, seed, names)["voc_svm_map"]))
    except ValueError as err:
        if isinstance(err, (ConfigError, DataError)):
            raise
        raise DataError(f"voc-svm on {train.name}: {err}") from err
    return out


def run(args: argparse.Namespace) -> int:
    """``eval --protocol voc-svm``: prints the mAP, each class's AP and chosen cost (or one JSON with --json)."""
    opened, device, model, train, test = open_model_and_splits(args)
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "method": opened.method, "protocol": "voc-svm",
                              "data": args.data, "test_data": test.name, "feature": "pooled",
                              "svm_costs": list(VOC_SVM_COSTS), "seed": args.seed}
    if opened.payload is None:
        result.update(backbone=model.name, backbone_file=opened.file.description, image_size=opened.image_size)
    layers = tuple(args.layers.split(",")) if args.layers else ()
    result.update(evaluate_voc_svm(model, train, test, device, args.seed, layers, args.layer_dim))
    print_result(result, args.json)
    return 0
