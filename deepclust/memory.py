"""The memory bank: one L2-normalised feature row per training sample, kept as module state."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MemoryBank(nn.Module):
    """Rows ``features[i]`` updated as m_i <- normalise((1 - eta) m_i + eta f_i) after each step.

    A registered buffer, so it travels with ``state_dict`` into every checkpoint.
    """

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5, seed: int = 0):
        super().__init__()
        self.momentum = momentum
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("features", F.normalize(torch.randn(num_samples, dim, generator=gen), dim=1))

    def __len__(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor) -> None:
        """Momentum update of the rows ``index`` with the (detached) batch features."""
        feats = F.normalize(feats.detach().float(), dim=1)
        mixed = (1 - self.momentum) * self.features[index] + self.momentum * feats
        self.features[index] = F.normalize(mixed, dim=1)

    @torch.no_grad()
    def fill(self, feats: torch.Tensor) -> None:
        """Replace every row, e.g. from a feature pass over the whole training set."""
        self.features.copy_(F.normalize(feats.float(), dim=1))

    def logits(self, feats: torch.Tensor, tau: float) -> torch.Tensor:
        """Non-parametric softmax logits f . m_j / tau against every bank row: (B, N)."""
        return feats.float() @ self.features.t() / tau
