"""The memory bank: one L2-normalised feature row per training sample, kept as module state."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cluster.kmeans import centroid_sums
from .runtime import exact_float32

BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class MemoryBank(nn.Module):
    """Rows ``features[i]`` updated as m_i <- normalise((1 - eta) m_i + eta f_i) after each step.

    A registered buffer, so it travels with ``state_dict`` into every checkpoint. ``dtype="float16"`` stores
    the rows in half the memory (unit-norm entries keep about 3 significant digits); every computation on them
    (update, logits, ``rows``, ``class_sums``, a kNN graph) is in float32, a chunk of rows at a time.
    """

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5, seed: int = 0, dtype: str = "float32"):
        super().__init__()
        if dtype not in BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {', '.join(BANK_DTYPES)}, not {dtype!r}")
        self.momentum = momentum
        gen = torch.Generator().manual_seed(seed)
        rows = F.normalize(torch.randn(num_samples, dim, generator=gen), dim=1)
        self.register_buffer("features", rows.to(BANK_DTYPES[dtype]))

    def __len__(self) -> int:
        return self.features.shape[0]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` in float32."""
        return self.features[index].float()

    def dense(self) -> torch.Tensor:
        """Every row in float32: the buffer itself, or a transient float32 copy of a float16 bank."""
        return self.features.float()

    def class_sums(self, labels: torch.Tensor, k: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """``centroid_sums`` of the rows grouped by ``labels``, in float32; a float16 bank a chunk at a time."""
        if self.features.dtype == torch.float32:
            return centroid_sums(self.features, labels, k)
        parts = [centroid_sums(self.features[i:i + chunk].float(), labels[i:i + chunk], k)
                 for i in range(0, len(self), chunk)]
        return sum(s for s, _ in parts), sum(c for _, c in parts)

    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor) -> None:
        """Momentum update of the rows ``index`` with the (detached) batch features."""
        feats = F.normalize(feats.detach().float(), dim=1)
        mixed = (1 - self.momentum) * self.rows(index) + self.momentum * feats
        self.features[index] = F.normalize(mixed, dim=1).to(self.features.dtype)

    @torch.no_grad()
    def fill(self, feats: torch.Tensor) -> None:
        """Replace every row, e.g. from a feature pass over the whole training set."""
        self.features.copy_(F.normalize(feats.float(), dim=1))

    def logits(self, feats: torch.Tensor, tau: float, chunk: int = 65536) -> torch.Tensor:
        """Non-parametric softmax logits f . m_j / tau against every bank row: (B, N), in float32 even under
        autocast (which would otherwise cast the whole bank to bf16 on every call). A float16 bank is
        multiplied a chunk of rows at a time, so no float32 copy of the whole bank is made."""
        feats = feats.float()
        if torch.compiler.is_compiling():  # the compiled loss keeps its graph's precision (no context to trace)
            return self.float32_logits(feats, tau, chunk)
        with exact_float32():  # no TF32: its 1e-3 relative error, divided by tau, would reach the logits
            return self.float32_logits(feats, tau, chunk)

    def float32_logits(self, feats: torch.Tensor, tau: float, chunk: int) -> torch.Tensor:
        with torch.autocast(feats.device.type, enabled=False):
            if self.features.dtype == torch.float32:
                return feats @ self.features.t() / tau
            return torch.cat([feats @ part.float().t() for part in self.features.split(chunk)], dim=1) / tau
