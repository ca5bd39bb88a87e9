"""Image folders: an ImageFolder (class subfolders) or a flat folder of unlabelled images, decoded with PIL."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .images import DataError, ImageData
from .pixels import check_memory
from .torchvision_sources import TORCHVISION_SOURCES

log = logging.getLogger(__package__)  # "deepclust.data", as before the split into a package

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_image_folder(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Files and labels of an ImageFolder; a folder holding images directly is unlabelled."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        it = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    direct = images_in(root, recursive=False)
    if direct or not subdirs:
        if not direct:
            raise DataError(
                f"folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) and no class "
                "subfolders; point --data at a folder of images or of class subfolders"
            )
        return direct, None, None
    files, labels, classes = [], [], []
    for subdir in subdirs:
        found = images_in(subdir, recursive=True)
        if found:
            labels += [len(classes)] * len(found)
            classes.append(subdir.name)
            files += found
    if not files:
        raise DataError(
            f"folder {root} has subfolders ({', '.join(d.name for d in subdirs[:5])}) but no images in "
            "them; point --data at a folder of images or of class subfolders"
        )
    return files, labels, classes



def decode_images(files: list[Path], size: int | None, bad_images: str,
                  allow_none: bool = False) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode to RGB, shorter side resized to ``size`` (default: the first image's), centre-cropped.

    The memory the decoded set needs is checked first; images over PIL's decompression-bomb limit are refused.
    With ``allow_none`` (one chunk of many, ``size`` given) a chunk of only skipped images is empty, not an error.
    """
    from PIL import Image
    from tqdm import tqdm

    if size is None:
        try:
            with Image.open(files[0]) as first:  # reads the header only
                size = min(first.size)
        except Exception:  # the loop below reports it (or skips it)
            pass
    if size is not None:
        check_memory(len(files), size, f"{files[0].parent}")
    out, kept, skipped = [], [], []
    for i, path in enumerate(tqdm(files, desc="decoding images", leave=False, mininterval=2)):
        try:
            with Image.open(path) as img:
                if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale, don't clip
                    wide = np.asarray(img, dtype=np.float64)
                    top = 65535.0 if img.mode.startswith("I;16") else max(1.0, float(wide.max()))
                    img = Image.fromarray(np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
                rgb = img.convert("RGB")
        except Image.DecompressionBombError as err:
            if bad_images == "fail":
                raise DataError(f"refused image {path}: {err} Downscale it if it is genuine, or pass "
                                "bad_images=skip to skip such images") from err
            skipped.append(str(path))
            continue
        except Exception as err:  # PIL raises many types for corrupt files
            if bad_images == "fail":
                raise DataError(
                    f"cannot read image {path}: {err}. Fix or remove it, or pass bad_images=skip "
                    "to skip unreadable images (they are counted and logged)"
                ) from err
            skipped.append(str(path))
            continue
        if size is None:
            size = min(rgb.size)
        w, h = rgb.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            rgb = rgb.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            rgb = rgb.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))
        kept.append(i)
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
    if not out and allow_none and size is not None:
        return torch.empty((0, 3, size, size), dtype=torch.uint8), kept, skipped
    if not out:
        raise DataError(f"none of the {len(files)} images could be read (first: {skipped[0]})")
    return torch.stack(out), kept, skipped


def load_folder(path: Path, image_size: int | None, bad_images: str, subset: int | None,
                subset_seed: int) -> ImageData:
    """A folder of images as ImageData; ``subset`` (a fixed random subset, ``subset_seed``) is picked before
    decoding."""
    if not path.exists():
        raise DataError(f"no folder {path}; give an ImageFolder directory, a deepclust prepare cache, a .npz file, "
                        f"'digits', or NAME:ROOT with NAME in {', '.join(TORCHVISION_SOURCES)}")
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; give an ImageFolder directory or a .npz file")
    files, labels, classes = list_image_folder(path)
    if subset is not None and subset < len(files):
        pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(subset_seed))[:subset]
        pick = pick.sort().values.tolist()
        files = [files[i] for i in pick]
        labels = None if labels is None else [labels[i] for i in pick]
    images, kept, skipped = decode_images(files, image_size, bad_images)
    labels = None if labels is None else torch.tensor([labels[i] for i in kept], dtype=torch.long)
    paths = [files[i].relative_to(path).as_posix() for i in kept]
    return ImageData(images, labels, str(path), classes, skipped, paths)
