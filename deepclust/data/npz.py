"""``.npz`` files: ``images`` (N,H,W) or (N,H,W,C) uint8, optional ``labels``; the shape read from the header first."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import DataError, ImageData
from .pixels import check_memory, labels_tensor, to_nchw_uint8


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy stream, which is left at the first byte of the array."""
    version = np.lib.format.read_magic(f)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = header(f)
    return tuple(shape), fortran, dtype


def npz_images_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of an npz's 'images' array, read from its header (the array is not loaded)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive, archive.open("images.npy") as f:
            return read_npy_header(f)[0]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):  # np.load below reports what is wrong
        return None


def load_npz(path: Path, image_size: int | None) -> ImageData:
    """An npz file as ImageData; the memory it needs is checked from its header before its array is read."""
    if not path.is_file():
        raise DataError(f"no file {path}; give an .npz with 'images' (N,H,W[,C] uint8) and optional 'labels'")
    shape = npz_images_shape(path)
    if shape is not None and len(shape) in (3, 4):
        sides = shape[2:4] if len(shape) == 4 and shape[-1] not in (1, 3, 4) else shape[1:3]  # NCHW or NHW[C]
        check_memory(shape[0], image_size or min(sides), str(path), stored=int(np.prod(shape)))
    with np.load(path, allow_pickle=False) as npz:
        if "images" not in npz:
            raise DataError(f"{path} has no 'images' array (it has {sorted(npz.files)}); save the images "
                            "under the key 'images'")
        images = to_nchw_uint8(npz["images"], str(path))
        labels = labels_tensor(npz["labels"] if "labels" in npz else None, len(images), str(path))
    return ImageData(images, labels, str(path))
