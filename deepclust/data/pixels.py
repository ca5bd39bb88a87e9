"""Pixel arrays to uint8 (N, 3, S, S): layout, squaring, labels, and the memory check before decoding."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import available_memory
from .images import DataError


def square_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` and centre-crop to size x size. (N,3,H,W) uint8 in and out."""
    n, _, h, w = images.shape
    if h == w == size:
        return images
    out = []
    for start in range(0, n, 4096):  # chunks keep the float copy small
        x = images[start:start + 4096].float()
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=scale < 1, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(x[:, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def to_nchw_uint8(array: np.ndarray, what: str) -> torch.Tensor:
    """(N,H,W), (N,H,W,C) or (N,C,H,W) uint8 with C in 1, 3, 4 -> (N,3,H,W) uint8."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(f"{what}: images must be uint8, got {array.dtype}; convert them with .astype(np.uint8)")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise DataError(f"{what}: images must have shape (N,H,W) or (N,H,W,C), got {array.shape}")
    if array.shape[-1] not in (1, 3, 4) and array.shape[1] in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if array.shape[-1] not in (1, 3, 4):
        raise DataError(f"{what}: expected 1, 3 or 4 channels, got shape {array.shape}")
    if array.shape[0] == 0:
        raise DataError(f"{what}: holds no images")
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].contiguous()


def labels_tensor(labels, n: int, what: str) -> torch.Tensor | None:
    if labels is None:
        return None
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if labels.numel() != n:
        raise DataError(f"{what}: {labels.numel()} labels for {n} images; give one label per image")
    if (labels < 0).all():
        return None  # e.g. STL-10's unlabelled split
    return labels


def check_memory(n: int, size: int, what: str, stored: int = 0) -> None:
    """Fail before decoding when n images of size x size (uint8 RGB), plus ``stored`` bytes read first (an
    npz's array), cannot fit in the memory left."""
    need, free = stored + n * 3 * size * size, available_memory()
    if free is not None and need > free:
        also = f" plus {stored / 2**30:.2f} GiB stored" if stored else ""
        raise DataError(f"{what}: {n} images of {size}x{size} need about {need / 2**30:.2f} GiB (N x 3 x S x S "
                        f"bytes decoded{also}), but {free / 2**30:.2f} GiB of memory are available; pass subset=N or a "
                        "smaller image_size, or decode the data once into a cache read from disk: `deepclust prepare "
                        "SOURCE --out CACHE --size S`, then --data CACHE")
