"""Image folders: an ImageFolder (class subfolders) or a flat folder of unlabelled images, decoded with PIL."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .decode import Decoder, DecodeReport
from .images import DataError, ImageData
from .pixels import check_memory
from .torchvision_sources import TORCHVISION_SOURCES

log = logging.getLogger(__package__)  # "deepclust.data", as before the split into a package

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_image_folder(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Files and labels of an ImageFolder; a folder holding images directly is unlabelled."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    ignored: list[Path] = []

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        found = [p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file()]
        ignored.extend(p for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS and not p.name.startswith("."))
        return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)

    def say_ignored() -> None:  # a notes.txt among the photos is left out, and said so once
        if ignored:
            log.info("left out %d file(s) in %s whose names are not an image's (%s, ...), e.g. %s", len(ignored),
                     root, ", ".join(IMAGE_EXTENSIONS[:4]), sorted(ignored)[0].name)

    direct = images_in(root, recursive=False)
    if direct or not subdirs:
        if not direct:
            raise DataError(
                f"folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) and no class "
                "subfolders; point --data at a folder of images or of class subfolders"
            )
        say_ignored()
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
    say_ignored()
    return files, labels, classes


# The input each backbone was designed for: a folder's default image size is capped here, so that one folder of
# large photos does not make a 32 px network train on 900 px images (issue: the OOM killer ended such a run).
NATURAL_SIZES = {"convnet": 32, "resnet18_cifar": 32}
IMAGENET_SIZE = 224  # every other backbone has an ImageNet stem (or is built for one)
HEADER_SAMPLE = 2000  # a folder of more files has its sizes read from this many, spread evenly


def natural_size(backbone: str) -> int:
    return NATURAL_SIZES.get(backbone, IMAGENET_SIZE)


def shorter_sides(files: list[Path], sample: int = HEADER_SAMPLE) -> tuple[list[int], int]:
    """The shorter side of each file (or of ``sample`` files spread evenly over a larger folder), read from
    headers only; unreadable files are left out (decoding names them). Returns (sides, files read)."""
    from PIL import Image

    picked = files if len(files) <= sample else [files[i] for i in np.linspace(0, len(files) - 1, sample).astype(int)]
    sides = []
    for path in picked:
        try:
            with Image.open(path) as img:  # parses the header; no pixels decoded
                sides.append(min(img.size))
        except Exception:  # noqa: BLE001 - PIL raises many types; decode_images reports the file by kind
            continue
    return sides, len(picked)


def default_image_size(files: list[Path], backbone: str | None, what: str) -> int | None:
    """The image size a folder gets when none is given: the median shorter side of its images (from headers),
    capped at ``backbone``'s natural input (``natural_size``); logged with the range found and the key that
    changes it, and a warning, once, when the sizes vary widely. None when no header could be read."""
    sides, read = shorter_sides(files)
    if not sides:
        return None
    sides.sort()
    median = sides[(len(sides) - 1) // 2]  # the lower median: a size some image really has
    size, capped = median, ""
    if backbone is not None and median > natural_size(backbone):
        size, capped = natural_size(backbone), f", capped at {backbone}'s natural input of {natural_size(backbone)} px"
    sampled = f" (a sample of {read} of {len(files)})" if read < len(files) else ""
    log.info("image size %d: the median shorter side of %d images%s in %s is %d px (range %d-%d px)%s; set "
             "image_size=N to choose another", size, len(sides), sampled, what, median, sides[0], sides[-1], capped)
    low, high = sides[len(sides) // 10], sides[-1 - len(sides) // 10]
    if sides[-1] > 2 * sides[0]:
        log.warning("the images in %s vary widely in size (shorter sides %d-%d px, 80%% within %d-%d px): every one "
                    "is resized to %d px; set image_size=N for another size", what, sides[0], sides[-1], low, high,
                    size)
    return size


def decode_images(files: list[Path], size: int | None, bad_images: str, allow_none: bool = False,
                  workers: int | None = None, backbone: str | None = None) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode to RGB, upright, shorter side resized to ``size`` (default: ``default_image_size``), centre-cropped.

    The memory the decoded set needs is checked first; images over PIL's decompression-bomb limit are refused.
    ``workers`` decoding processes (None: one per core). With ``allow_none`` (one chunk of many, ``size`` given) a
    chunk of only skipped images is empty, not an error. What was skipped or converted is logged by kind."""
    what = str(files[0].parent) if files else "the folder"
    # not one header could be read: every file is bad, and decoding says how
    size = size or default_image_size(files, backbone, what) or (natural_size(backbone) if backbone else 32)
    check_memory(len(files), size, what)
    with Decoder(size, bad_images, workers) as decoder:
        images, kept = decoder.decode(files)
    log_report(decoder.report)
    if not kept and not allow_none:
        raise DataError(f"none of the {len(files)} images could be read ({decoder.report.summary()})")
    return images, kept, decoder.report.skipped


def log_report(report: DecodeReport) -> None:
    """One warning for skipped files, one line for converted ones; each kind counted."""
    if report.skipped:
        log.warning("%s", report.summary())
    elif report.counts:
        log.info("%s", report.summary())


def load_folder(path: Path, image_size: int | None, bad_images: str, subset: int | None, subset_seed: int,
                backbone: str | None = None, workers: int | None = None) -> ImageData:
    """A folder of images as ImageData; ``subset`` (a fixed random subset, ``subset_seed``) is picked before
    decoding. Without ``image_size``, ``default_image_size`` for ``backbone`` chooses it."""
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
    what = str(path)
    size = image_size or default_image_size(files, backbone, what) or (natural_size(backbone) if backbone else 32)
    check_memory(len(files), size, what)
    with Decoder(size, bad_images, workers) as decoder:
        images, kept = decoder.decode(files)
    log_report(decoder.report)
    if not kept:
        raise DataError(f"none of the {len(files)} images in {path} could be read ({decoder.report.summary()})")
    labels = None if labels is None else torch.tensor([labels[i] for i in kept], dtype=torch.long)
    paths = [files[i].relative_to(path).as_posix() for i in kept]
    return ImageData(images, labels, str(path), classes, decoder.report.skipped, paths, dict(decoder.report.counts))
