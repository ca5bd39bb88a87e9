"""Samplers that make every pseudo-class count equally."""

from __future__ import annotations

import torch


def balanced_indices(labels: torch.Tensor, num_samples: int, gen: torch.Generator) -> torch.Tensor:
    """``num_samples`` sample ids drawn uniformly over the non-empty classes of ``labels``.

    Each non-empty class is drawn num_samples // K or one more times (K non-empty classes), its
    members in a random order, cycled when it is smaller than its share; then the whole list is
    shuffled. DeepCluster's uniform cluster sampling and UIC's class-balanced sampling.
    """
    labels = labels.cpu()
    n = labels.numel()
    perm = torch.randperm(n, generator=gen)
    order = perm[torch.argsort(labels[perm], stable=True)]  # members grouped by class, random within
    sizes = torch.bincount(labels)
    classes = torch.nonzero(sizes).flatten()
    k = classes.numel()
    counts = torch.full((k,), num_samples // k, dtype=torch.long)
    counts[torch.randperm(k, generator=gen)[: num_samples % k]] += 1
    starts = torch.cumsum(sizes, 0) - sizes
    draw_class = torch.repeat_interleave(classes, counts)
    rank = torch.arange(num_samples) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    picks = order[starts[draw_class] + rank % sizes[draw_class]]
    return picks[torch.randperm(num_samples, generator=gen)]


def class_weights(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Loss weight per class, w_c proportional to 1 / sqrt(N_c), summing to 1 over non-empty classes (ODC)."""
    counts = torch.bincount(labels, minlength=k).float()
    w = torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))
    return w / w.sum()
