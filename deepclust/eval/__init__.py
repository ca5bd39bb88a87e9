"""Evaluation protocols: weighted kNN, linear probes, clustering metrics, few-shot episodes, low-shot SVMs."""

from .clustering import assignment_metrics, cluster_metrics, contingency, hungarian_accuracy, hungarian_match, nmi
from .features import extract_features
from .fewshot import fewshot_accuracy
from .knn import knn_accuracy, knn_predict
from .linear import linear_probe
from .linear_sgd import sgd_linear_probe
from .lowshot import lowshot_svm
from .protocols import PROTOCOLS, evaluate_backbone

__all__ = [
    "PROTOCOLS", "assignment_metrics", "cluster_metrics", "contingency", "evaluate_backbone", "extract_features",
    "fewshot_accuracy", "hungarian_accuracy", "hungarian_match", "knn_accuracy", "knn_predict", "linear_probe",
    "lowshot_svm", "nmi", "sgd_linear_probe",
]
