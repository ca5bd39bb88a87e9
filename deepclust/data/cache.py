"""A prepared cache (``deepclust prepare``): its file layout, header check, and loading as ``DiskImages``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .images import DataError, DiskImages, ImageData
from .pixels import labels_tensor

# A prepared cache: CACHE_PIXELS holds N fixed-size records of 3 x S x S uint8, row i at offset i * 3 * S * S.
CACHE_HEADER, CACHE_PIXELS, CACHE_LABELS, CACHE_FILES = "cache.json", "images.u8", "labels.npy", "files.json"
CACHE_FORMAT, CACHE_VERSION = "deepclust-cache", 1


def read_cache_header(folder: Path) -> dict:
    """The header of a prepared cache, checked against its pixel file; DataError names what to redo."""
    header_path, pixels = folder / CACHE_HEADER, folder / CACHE_PIXELS
    redo = f"run `deepclust prepare SOURCE --out {folder} --size S` again (into a new --out)"
    if not header_path.is_file():
        raise DataError(f"{folder} holds {CACHE_PIXELS} but no {CACHE_HEADER}: an unfinished or interrupted "
                        f"deepclust prepare; delete it and {redo}")
    try:
        header = json.loads(header_path.read_text())
        n, size = int(header["num_images"]), int(header["image_size"])
        ok = header["format"] == CACHE_FORMAT and n > 0 and size > 0
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{header_path} is not a valid cache header ({err}); {redo}") from err
    if not ok or header.get("version") != CACHE_VERSION:
        raise DataError(f"{header_path}: not a {CACHE_FORMAT} version {CACHE_VERSION} header (format "
                        f"{header.get('format')!r}, version {header.get('version')!r}); {redo} with this deepclust")
    expected = n * 3 * size * size
    found = pixels.stat().st_size if pixels.is_file() else None
    if found != expected:
        raise DataError(f"{pixels} holds {found} bytes, but the header's {n} x 3 x {size} x {size} images need "
                        f"{expected}: the cache is damaged; {redo}")
    return header


def is_cache(folder: Path) -> bool:
    return (folder / CACHE_HEADER).is_file() or (folder / CACHE_PIXELS).is_file()


def load_cache(folder: Path, image_size: int | None) -> ImageData:
    """A prepared cache as ImageData whose ``images`` are DiskImages."""
    header = read_cache_header(folder)
    n, size = header["num_images"], header["image_size"]
    if image_size is not None and image_size != size:
        raise DataError(f"{folder} holds {size}x{size} images, not {image_size}x{image_size}; prepare a cache with "
                        f"--size {image_size}, or train at image_size={size}")
    labels = None
    if (folder / CACHE_LABELS).is_file():
        labels = labels_tensor(np.load(folder / CACHE_LABELS, allow_pickle=False), n, str(folder))
    files = json.loads((folder / CACHE_FILES).read_text()) if (folder / CACHE_FILES).is_file() else {}
    images = DiskImages(folder / CACHE_PIXELS, n, size)
    return ImageData(images, labels, str(folder), header.get("classes"), files.get("skipped", []), files.get("paths"))
