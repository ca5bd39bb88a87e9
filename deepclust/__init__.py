"""deepclust: clustering-based unsupervised representation learning of images."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def fit(method: str = "npid", resume: bool = False, overwrite: bool = False, **keys: Any) -> dict[str, Any]:
    """Train ``method`` with any config keys (as on the command line); returns the last metrics row.
    ``resume`` / ``overwrite``: as ``deepclust train --resume`` / ``--overwrite`` for an ``out`` that holds a run.

    >>> fit("deepcluster", data="digits", backbone="convnet", epochs=2, k=50, out="runs/api")  # doctest: +SKIP
    """
    from .config import resolve
    from .train import train

    cfg, hparams = resolve([{"method": method, **keys}])
    return train(cfg, hparams, resume=resume, overwrite=overwrite)


def load_backbone(path: str):
    """The trained backbone of an exported ``.safetensors`` file (``deepclust export``) or a checkpoint, as a
    ready ``nn.Module`` in eval mode: normalised images (B, 3, S, S) -> pooled features (B, D)."""
    from .export import load_backbone as load

    return load(path)
