"""Cluster labels over training: what a method logs about its clusters each epoch (SwAV, DeepClusterV2, SeLa)."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import size_stats


def label_stats(new: torch.Tensor, old: torch.Tensor | None, k: int, true_labels: torch.Tensor | None,
                prefix: str = "") -> dict[str, float]:
    """Sizes of the clusters ``new`` (N,), the share of samples whose label changed since ``old`` and NMI with
    it (when ``old`` labels every sample), and NMI with the true labels (logging only)."""
    from ..eval.clustering import nmi

    stats: dict[str, float] = {f"{prefix}{name}": v for name, v in size_stats(new, k).items()}
    if old is not None and bool((old >= 0).all()):
        stats[f"{prefix}label_change"] = float((new != old).float().mean())
        stats[f"{prefix}nmi_prev"] = nmi(old, new)
    if true_labels is not None:
        stats[f"{prefix}nmi_labels"] = nmi(true_labels, new)
    return stats


class LabelHistory(nn.Module):
    """Each sample's latest cluster label as a method assigns them during an epoch (SwAV: its nearest prototype
    when last seen), in buffers: ``record`` writes on the device in the step, ``epoch_stats`` compares with the
    labels at the epoch's start."""

    def __init__(self, num_samples: int):
        super().__init__()
        self.register_buffer("labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.register_buffer("epoch_start", torch.full((num_samples,), -1, dtype=torch.long))

    @torch.no_grad()
    def record(self, index: torch.Tensor, labels: torch.Tensor) -> None:
        self.labels.index_copy_(0, index, labels)

    def epoch_stats(self, k: int, true_labels: torch.Tensor | None) -> dict[str, float]:
        if not bool((self.labels >= 0).all()):
            return {}
        stats = label_stats(self.labels, self.epoch_start, k, true_labels)
        self.epoch_start.copy_(self.labels)
        return stats

    def assignments(self) -> torch.Tensor | None:
        return self.labels if bool((self.labels >= 0).all()) else None
