"""Subsets of loaded data: a fixed random one, and a class-imbalanced (long-tailed) one."""

from __future__ import annotations

import torch

from .images import DataError, ImageData


def random_subset(data: ImageData, subset: int | None, seed: int = 0) -> ImageData:
    """A fixed random subset of ``subset`` images, drawn with ``seed``; all of ``data`` when it holds no more."""
    if subset is not None and subset < len(data):
        gen = torch.Generator().manual_seed(seed)
        data = data.subset(torch.randperm(len(data), generator=gen)[:subset].sort().values)
    return data


def long_tail_counts(class_sizes: list[int], ratio: float) -> list[int]:
    """Images kept per class for a long-tailed subset: class c of C keeps n_max * ratio^(-c / (C - 1)) (the
    exponential profile of the long-tail literature, e.g. CIFAR-10-LT), n_max the smallest class's size, so
    that the largest to smallest count is ``ratio`` up to rounding."""
    if ratio < 1:
        raise DataError(f"subset_imbalance={ratio} must be at least 1 (the largest to smallest class ratio)")
    top, last = min(class_sizes), max(len(class_sizes) - 1, 1)
    return [max(1, round(top * ratio ** (-c / last))) for c in range(len(class_sizes))]


def long_tail_subset(data: ImageData, ratio: float, seed: int = 0) -> ImageData:
    """A class-imbalanced subset (``long_tail_counts``; class 0 the largest), its images drawn with ``seed``."""
    if data.labels is None:
        raise DataError(f"{data.name}: subset_imbalance needs class labels (class subfolders or 'labels'); drop "
                        "subset_imbalance for unlabelled data")
    classes = data.labels.unique().tolist()
    members = [torch.nonzero(data.labels == c).flatten() for c in classes]
    gen = torch.Generator().manual_seed(seed)
    keep = [m[torch.randperm(m.numel(), generator=gen)[:n]]
            for m, n in zip(members, long_tail_counts([m.numel() for m in members], ratio), strict=True)]
    return data.subset(torch.cat(keep).sort().values)
