"""torchvision's datasets read from their local files, never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from .images import DataError, ImageData
from .pixels import labels_tensor, to_nchw_uint8

TORCHVISION_SOURCES = ("cifar10", "cifar100", "stl10", "svhn", "mnist")
SPLITS = ("train", "test", "unlabeled", "train+unlabeled", "extra")


def load_torchvision(name: str, root: str, split: str) -> ImageData:
    import torchvision.datasets as tvd

    if not Path(root).is_dir():
        raise DataError(f"{name}: no folder {root}; give the folder holding torchvision's {name} files "
                        "(deepclust never downloads)")
    what = f"{name}:{root}:{split}"
    try:
        if name in ("cifar10", "cifar100", "mnist"):
            if split not in ("train", "test"):
                raise DataError(f"{name} has splits train and test, not {split!r}")
            cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST}[name]
            ds = cls(root, train=split == "train", download=False)
            data = ds.data.numpy() if torch.is_tensor(ds.data) else ds.data
            targets, classes = ds.targets, list(ds.classes)
        elif name == "stl10":
            ds = tvd.STL10(root, split=split, download=False)
            data, targets, classes = ds.data, ds.labels, list(ds.classes)
        else:  # svhn
            ds = tvd.SVHN(root, split=split, download=False)
            data, targets, classes = ds.data, ds.labels, [str(i) for i in range(10)]
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{what}: torchvision could not read its files under {root} ({err}); "
                        f"place the {name} files there (deepclust never downloads)") from err
    images = to_nchw_uint8(data, what)
    return ImageData(images, labels_tensor(targets, len(images), what), what, classes)
