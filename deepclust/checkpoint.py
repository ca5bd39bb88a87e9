"""Checkpoints: written atomically, loaded with ``weights_only=True`` (never unpickling code), checked
against a digest of their contents (a flipped byte in tensor data otherwise loads silently)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .backbones import Backbone

FORMAT = "deepclust/1"
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to another method or backbone."""


def tensor_digest(obj: Any, h: Any = None) -> str:
    """sha256 over a nested payload: keys, values, and every tensor's dtype, shape and bytes, in key order."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            h.update(str(key).encode())
            tensor_digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            tensor_digest(item, h)
    else:  # numbers, strings, None: their repr is stable
        h.update(repr(obj).encode())
    return h.hexdigest()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: a crash or a full disk never touches the previous checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"format": FORMAT, **payload, "versions": {"deepclust": __version__, "torch": str(torch.__version__)}}
    payload["digest"] = tensor_digest(payload)
    try:
        with open(tmp, "wb") as f:  # a Python file: a failed write raises OSError with its errno (ENOSPC)
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"{'the disk is full' if full else 'cannot write'} while writing {tmp} ({err}); "
                              f"{previous}. Free space under {path.parent} and run again with --resume") from err
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint {path}")
    damaged = (f"{path} is truncated or corrupted (it was complete when written: damaged since, e.g. by a copy "
               "or the disk); restore a good copy, or delete it and train again without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or one that would need unpickling arbitrary objects
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unpickl" in str(err):
            raise CheckpointError(f"cannot load {path} as a deepclust checkpoint: {first}") from err
        raise CheckpointError(f"{damaged} ({first})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a deepclust checkpoint (expected format {FORMAT})")
    digest = payload.pop("digest", None)
    if digest is not None and tensor_digest(payload) != digest:
        raise CheckpointError(f"{damaged} (its tensors do not match the digest written with them)")
    versions = payload.get("versions", {})
    here = {"deepclust": __version__, "torch": str(torch.__version__)}
    if versions and versions != here:
        log.warning("%s was written by %s, this is %s: it loads, but results may differ slightly", path,
                    ", ".join(f"{k} {v}" for k, v in versions.items()), ", ".join(f"{k} {v}" for k, v in here.items()))
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
