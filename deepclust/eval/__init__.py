"""Evaluation protocols: weighted kNN, linear probe, clustering metrics."""

from .clustering import cluster_metrics, hungarian_accuracy, nmi
from .features import extract_features
from .knn import knn_accuracy, knn_predict
from .linear import linear_probe
from .protocols import PROTOCOLS, evaluate_backbone

__all__ = [
    "PROTOCOLS", "cluster_metrics", "evaluate_backbone", "extract_features", "hungarian_accuracy", "knn_accuracy",
    "knn_predict", "linear_probe", "nmi",
]
