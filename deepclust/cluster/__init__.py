"""Clustering building blocks shared by the methods: k-means, PCA-whitening, kNN graphs, strongly connected
subgraphs, samplers, statistics."""

from __future__ import annotations

import torch

from .geometry import ClusterGeometry, cluster_geometry
from .graph import knn_graph
from .kmeans import (
    ClusteringError,
    KMeansResult,
    centroid_sums,
    check_cluster_count,
    cluster_count,
    dissolve_small_clusters,
    kmeans,
    nearest_centroid,
    split_empty_clusters,
    split_in_two,
)
from .pca import pca_whiten
from .sampling import balanced_indices, class_weights
from .scs import member_table, scs_stats, singletons_apart, strongly_connected_subgraphs


def size_stats(labels: torch.Tensor, k: int, prefix: str = "cluster_size") -> dict[str, float]:
    """min / median / max of the class sizes (empty classes count as 0)."""
    sizes = torch.bincount(labels.cpu(), minlength=k).float()
    return {f"{prefix}_min": int(sizes.min()), f"{prefix}_median": float(sizes.median()),
            f"{prefix}_max": int(sizes.max()), f"{prefix}_empty": int((sizes == 0).sum())}


__all__ = [
    "ClusterGeometry", "ClusteringError", "KMeansResult", "balanced_indices", "centroid_sums", "check_cluster_count",
    "class_weights", "cluster_count", "cluster_geometry", "dissolve_small_clusters", "kmeans", "knn_graph",
    "member_table", "nearest_centroid", "pca_whiten", "scs_stats", "singletons_apart", "size_stats",
    "split_empty_clusters", "split_in_two", "strongly_connected_subgraphs",
]
