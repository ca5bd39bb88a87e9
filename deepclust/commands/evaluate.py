"""``deepclust eval``: a trained network's features judged on labelled data (``deepclust.eval``); the pieces
every protocol's command shares (this module's ``run``, ``commands/voc_svm.py``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..backbone_files import OpenedBackbone, open_backbone
from ..config import ConfigError
from ..data import DataError, ImageData, load_train_test
from ..eval import evaluate_backbone
from ..eval.knn import usable_k


def open_model_and_splits(args: argparse.Namespace) -> tuple[OpenedBackbone, torch.device, Any, ImageData,
                                                                 ImageData]:
    """The checkpoint's network on ``--device`` and the train / test splits at its image size."""
    opened = open_backbone(args.checkpoint, args.backbone, args.image_size, args.feature)
    device = torch.device(args.device)
    model = opened.model.to(device)
    train, test = load_train_test(args.data, args.test_data, opened.image_size, args.bad_images, labels=args.labels)
    if test is None:
        raise DataError("eval needs --test-data (labelled) unless --data has an obvious test split "
                        "(voc2007:ROOT: its test split)")
    return opened, device, model, train, test


def print_result(result: dict[str, Any], as_json: bool) -> None:
    """One JSON line, or a ``key: value`` line each (floats to 4 places)."""
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def run(args: argparse.Namespace) -> int:
    """``deepclust eval`` with the single-label protocols (kNN, linear, cluster, few-shot, low-shot)."""
    if args.layers and args.protocol not in ("linear", "all"):
        raise ConfigError(f"--layers probes stages with the linear protocol; use --protocol linear or all, not "
                          f"{args.protocol}")
    if args.probe != "fast" and args.protocol not in ("linear", "all"):
        raise ConfigError(f"--probe {args.probe} trains the linear protocol's probe; use --protocol linear or all, "
                          f"not {args.protocol}")
    if args.k < 1 or not args.tau > 0:
        raise ConfigError(f"--k must be at least 1 and --tau above 0, got {args.k} and {args.tau}")
    opened, device, model, train, test = open_model_and_splits(args)
    feature = opened.eval_feature
    result = {"checkpoint": str(args.checkpoint), "method": opened.method, "protocol": args.protocol,
              "data": args.data, "test_data": test.name,
              "feature": "pooled" if args.protocol == "linear" else feature}
    if args.labels:  # the labels a person gave (the cluster browser's labels.csv) and, on class folders, their accuracy
        result["labels"] = args.labels
        if train.labels_agreement is not None:
            result["labels_agreement"] = 100 * train.labels_agreement
    if opened.payload is None:  # a plain backbone file: say which network was evaluated
        result.update(backbone=model.name, backbone_file=opened.file.description, image_size=opened.image_size)
    if args.protocol in ("knn", "all"):  # the k used: at most what the training set allows (logged when capped)
        result["k"] = usable_k(args.k, train.labels) if train.labels is not None else args.k
    if args.protocol in ("linear", "all"):
        result["probe"] = args.probe
        if args.probe == "sgd":
            result.update(probe_epochs=args.probe_epochs, seed=args.seed)
    if args.protocol in ("linear", "all") and args.layers:
        result["layer_dim"] = args.layer_dim
    if args.protocol in ("cluster", "all"):
        result["cluster_on"] = args.cluster_on
    if args.protocol in ("fewshot", "all"):
        result.update(fewshot_queries=args.queries, fewshot_episodes=args.episodes, seed=args.seed)
    if args.protocol in ("lowshot", "all"):
        result.update(lowshot_draws=args.lowshot_draws, svm_cost=args.svm_cost, seed=args.seed)
    result.update(evaluate_backbone(model, train, test, feature, (args.protocol,), device, args.k, args.tau,
                                    args.cluster_on, args.ways, tuple(args.shots), args.queries, args.episodes,
                                    args.seed, tuple(args.layers.split(",")) if args.layers else (),
                                    args.layer_dim, probe=args.probe, probe_epochs=args.probe_epochs,
                                    lowshot_shots=tuple(args.lowshot_shots), lowshot_draws=args.lowshot_draws,
                                    svm_cost=args.svm_cost))
    print_result(result, args.json)
    return 0
