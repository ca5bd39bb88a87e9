"""Checkpoints: written atomically, loaded with ``weights_only=True`` (never unpickling code)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .backbones import Backbone

FORMAT = "deepclust/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to another method or backbone."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or one that would need unpickling arbitrary objects
        raise CheckpointError(f"cannot load {path} as a deepclust checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a deepclust checkpoint (expected format {FORMAT})")
    return payload


def check_compatible(payload: dict[str, Any], method: str | None = None, backbone: dict[str, Any] | None = None,
                     path: str | Path = "checkpoint") -> None:
    """Raise unless the checkpoint holds ``method`` (if given) and a backbone built like ``backbone``
    (name, width, sobel, embed_dim, ...: every key given must match)."""
    if method is not None and payload["method"] != method:
        raise CheckpointError(f"{path} is a checkpoint of method {payload['method']!r}, not {method!r}; "
                              f"resume with --method {payload['method']} or use a new --out folder")
    for key, want in (backbone or {}).items():
        have = payload["backbone"].get(key)
        if have != want:
            fix = f"--backbone {have}" if key == "name" else f"{key}={have}"
            raise CheckpointError(f"{path} holds a backbone with {key} {have!r}, not {want!r}; pass {fix} to match it")


def backbone_from_checkpoint(payload: dict[str, Any]) -> Backbone:
    """Rebuild the trained backbone (heads of the method dropped) from a checkpoint payload."""
    spec = payload["backbone"]
    model = Backbone(spec["name"], spec["image_size"], spec["embed_dim"], spec["sobel"], spec["width"])
    state = {k[len("backbone."):]: v for k, v in payload["state"].items() if k.startswith("backbone.")}
    model.load_state_dict(state)
    return model.to(memory_format=torch.channels_last)
