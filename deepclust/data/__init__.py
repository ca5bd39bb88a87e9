"""Datasets. Every source becomes one in-memory uint8 tensor (N, 3, S, S) plus optional labels; a prepared
cache (``deepclust prepare``) instead becomes ``DiskImages``, rows read from disk when indexed.

Sources (one ``--data`` string):
  digits[:train|test]        scikit-learn's bundled 8x8 digits, upsampled to 32x32 (no file needed)
  DIR                        an ImageFolder (class subfolders) or a flat folder of unlabelled images
  CACHE                      a folder written by ``deepclust prepare`` (found by its cache.json)
  FILE.npz                   ``images`` (N,H,W) or (N,H,W,C) uint8, optional ``labels``
  NAME:ROOT[:SPLIT]          torchvision's local files, never downloaded; NAME in cifar10, cifar100,
                             stl10, svhn, mnist
  voc2007:ROOT[:SPLIT]       Pascal VOC from a local VOCdevkit (also voc2012): multi-label targets, boxes, masks
                             (``voc``; SPLIT train, val, trainval or test)

Labels are only ever used for evaluation (and by the ``supervised`` reference method).

One module per part: ``images`` (ImageData, DiskImages, DataError), ``pixels`` (uint8 layout, squaring, the
memory check), ``decode`` (files to pixels: orientation, DCT scaling, a process pool, odd files by kind),
``digits``, ``folder`` (listing, the default size), ``npz``, ``torchvision_sources``, ``cache`` (prepared caches) and
``subsets``; this module parses a ``--data`` string and dispatches to them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .cache import (
    CACHE_FILES,
    CACHE_FORMAT,
    CACHE_HEADER,
    CACHE_LABELS,
    CACHE_PIXELS,
    CACHE_VERSION,
    is_cache,
    load_cache,
    read_cache_header,
)
from .decode import Decoder, DecodeReport, decode_file
from .digits import load_digits
from .folder import (
    IMAGE_EXTENSIONS,
    decode_images,
    default_image_size,
    list_image_folder,
    load_folder,
    log_report,
    natural_size,
)
from .images import DataError, DiskImages, ImageData, IndexedImages
from .labels_file import align_classes, apply_labels_file, read_labels_csv
from .npz import load_npz, npz_images_shape, read_npy_header
from .pixels import check_memory, labels_tensor, square_uint8, to_nchw_uint8
from .subsets import long_tail_counts, long_tail_subset, random_subset
from .torchvision_sources import SPLITS, TORCHVISION_SOURCES, load_torchvision
from .voc import VOC_SOURCES, VOCImageData, load_voc, parse_voc_spec

__all__ = [
    "CACHE_FILES", "CACHE_FORMAT", "CACHE_HEADER", "CACHE_LABELS", "CACHE_PIXELS", "CACHE_VERSION",
    "IMAGE_EXTENSIONS", "SPLITS", "TORCHVISION_SOURCES", "DataError", "Decoder", "DecodeReport", "DiskImages",
    "ImageData", "IndexedImages", "check_memory", "decode_file", "decode_images", "default_image_size",
    "default_test_spec", "is_cache", "labels_tensor", "list_image_folder", "load_cache", "load_data", "load_digits",
    "load_folder", "load_npz", "load_torchvision", "load_train_test", "log_report", "long_tail_counts",
    "long_tail_subset", "natural_size", "npz_images_shape", "parse_spec", "random_subset", "read_cache_header",
    "read_labels_csv", "align_classes", "apply_labels_file",
    "read_npy_header", "square_uint8", "to_nchw_uint8", "VOC_SOURCES", "VOCImageData", "load_voc",
]

log = logging.getLogger(__name__)


def parse_spec(spec: str, default_split: str) -> tuple[str, str | None, str]:
    """'digits', 'digits:test', 'cifar10:/root', 'cifar10:/root:test', 'file.npz', 'dir' -> (kind, root, split)."""
    head, _, rest = spec.partition(":")
    if head in VOC_SOURCES:
        return (head, *parse_voc_spec(head, rest, default_split))
    if head in ("digits", *TORCHVISION_SOURCES):
        root, split = rest, default_split
        if head == "digits":
            return "digits", None, rest or default_split
        maybe_root, _, maybe_split = rest.rpartition(":")
        if maybe_root and maybe_split in SPLITS:
            root, split = maybe_root, maybe_split
        if not root:
            raise DataError(f"{spec!r}: give the folder of the local files, e.g. {head}:/data/{head}")
        return head, root, split
    if spec.endswith(".npz"):
        return "npz", spec, default_split
    return "folder", spec, default_split


def load_data(
    spec: str,
    split: str = "train",
    image_size: int | None = None,
    bad_images: str = "fail",
    subset: int | None = None,
    subset_seed: int = 0,
    subset_imbalance: float | None = None,
    backbone: str | None = None,
    workers: int | None = None,
    labels: str | None = None,
) -> ImageData:
    """Load any supported source as an in-memory ``ImageData``; see the module docstring.

    ``subset`` keeps a fixed random subset; ``subset_imbalance`` then a long-tailed one (``long_tail_subset``,
    ODC's protocol with ratio 64). Without ``image_size`` a source keeps its own size; a folder, whose files may
    differ, gets their median shorter side capped at ``backbone``'s natural input (``default_image_size``).
    A folder is decoded by ``workers`` processes (None: one per core). ``labels`` (a path,label or index,label
    CSV, e.g. the cluster browser's labels.csv) replaces the source's labels; images it does not list are left out.
    """
    if bad_images not in ("fail", "skip"):
        raise DataError(f"bad_images must be 'fail' or 'skip', not {bad_images!r}")
    kind, root, split = parse_spec(spec, split)
    if kind == "digits":
        data = load_digits(split)
    elif kind == "npz":
        data = load_npz(Path(root), image_size)
    elif kind == "folder" and Path(root).is_dir() and is_cache(Path(root)):
        data = load_cache(Path(root), image_size)
    elif kind == "folder":
        data = load_folder(Path(root), image_size, bad_images, subset, subset_seed, backbone, workers)
        subset = None  # done before decoding, by load_folder: cheaper
    elif kind in VOC_SOURCES:
        data = load_voc(kind, root, split, image_size, bad_images, workers, backbone)
    else:
        data = load_torchvision(kind, root, split)
    data = random_subset(data, subset, subset_seed)
    if labels is not None:
        data = apply_labels_file(data, labels)
    if subset_imbalance is not None:
        data = long_tail_subset(data, subset_imbalance, subset_seed)
    size = image_size or min(data.images.shape[-2:])
    if not isinstance(data.images, DiskImages):  # a cache is already square, at its size (checked above)
        data.images = square_uint8(data.images, size)
    log.info("loaded %s: %d images of %dx%d%s", data.name, len(data), size, size,
             "" if data.labels is None else f", {data.num_classes} classes")
    return data


def default_test_spec(spec: str) -> str | None:
    """The test split that belongs with a training source, when one is obvious."""
    kind, root, split = parse_spec(spec, "train")
    if kind == "digits":
        return "digits:test"
    if kind in TORCHVISION_SOURCES and split in ("train", "train+unlabeled"):
        return f"{kind}:{root}:test"
    if kind in VOC_SOURCES and split in ("train", "trainval"):  # 2007: test; 2012: val (its test is not public)
        return f"{kind}:{root}:{'test' if kind == 'voc2007' else 'val'}"
    if kind == "folder":
        path = Path(root)
        if path.name == "train":
            for sibling in ("test", "val"):
                if (path.parent / sibling).is_dir():
                    return str(path.parent / sibling)
    return None


def load_train_test(spec: str, test_spec: str | None = None, image_size: int | None = None, bad_images: str = "fail",
                    subset: int | None = None, test_subset: int | None = None,
                    subset_imbalance: float | None = None,
                    backbone: str | None = None, labels: str | None = None) -> tuple[ImageData, ImageData | None]:
    """A training source and its test data (``test_spec``, else the split that belongs with ``spec``, else
    None), the test images at the training images' size. ``subset_imbalance`` applies to the training
    images only: the test set stays balanced. ``backbone`` caps a folder's default size (``load_data``).
    ``labels`` labels the training images (``load_data``); the test labels are renumbered onto its class names."""
    train = load_data(spec, "train", image_size, bad_images, subset, subset_imbalance=subset_imbalance,
                      backbone=backbone, labels=labels)
    test_spec = test_spec or default_test_spec(spec)
    test = load_data(test_spec, "test", image_size or train.image_size, bad_images, test_subset) if test_spec else None
    if labels is not None and test is not None:
        test = align_classes(train, test)
    return train, test
