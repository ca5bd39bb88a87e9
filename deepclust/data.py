"""Datasets. Every source becomes one in-memory uint8 tensor (N, 3, S, S) plus optional labels; a prepared
cache (``deepclust prepare``) instead becomes ``DiskImages``, rows read from disk when indexed.

Sources (one ``--data`` string):
  digits[:train|test]        scikit-learn's bundled 8x8 digits, upsampled to 32x32 (no file needed)
  DIR                        an ImageFolder (class subfolders) or a flat folder of unlabelled images
  CACHE                      a folder written by ``deepclust prepare`` (found by its cache.json)
  FILE.npz                   ``images`` (N,H,W) or (N,H,W,C) uint8, optional ``labels``
  NAME:ROOT[:SPLIT]          torchvision's local files, never downloaded; NAME in cifar10, cifar100,
                             stl10, svhn, mnist

Labels are only ever used for evaluation (and by the ``supervised`` reference method).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import available_memory

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TORCHVISION_SOURCES = ("cifar10", "cifar100", "stl10", "svhn", "mnist")
SPLITS = ("train", "test", "unlabeled", "train+unlabeled", "extra")


class DataError(ValueError):
    """A data source is missing, empty or unreadable. The message names the problem and the fix."""


# A prepared cache: CACHE_PIXELS holds N fixed-size records of 3 x S x S uint8, row i at offset i * 3 * S * S.
CACHE_HEADER, CACHE_PIXELS, CACHE_LABELS, CACHE_FILES = "cache.json", "images.u8", "labels.npy", "files.json"
CACHE_FORMAT, CACHE_VERSION = "deepclust-cache", 1


class DiskImages:
    """uint8 (N, 3, S, S) images read from a prepared cache when indexed, never held whole in memory.

    Indexing (an int, a slice, a LongTensor, an array or a list) returns a uint8 tensor. Rows are read with
    ``os.pread`` into a fresh buffer, sorted and coalesced into contiguous runs: unlike the pages of a memory
    map, they leave the process's resident memory once the batch is dropped. ``rows`` maps this view's
    positions to records of the file, so a subset is a new view, no pixels copied.
    """

    def __init__(self, path: Path, num_records: int, size: int, rows: np.ndarray | None = None):
        self.path, self.size, self.num_records = Path(path), size, num_records
        self.rows = np.arange(num_records, dtype=np.int64) if rows is None else rows
        self.record = 3 * size * size
        self.fd: int | None = None  # opened on first read, in each process (a forked worker shares it: pread)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "fd": None}  # a spawned DataLoader worker opens its own

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), 3, self.size, self.size))

    dtype, is_cuda, device = torch.uint8, False, torch.device("cpu")

    def positions(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return self.rows[key]
        key = np.asarray(key.cpu() if torch.is_tensor(key) else key)
        if key.dtype == bool:  # a mask, as a tensor takes it
            key = np.flatnonzero(key)
        return self.rows[key.astype(np.int64)]

    def subset(self, key) -> DiskImages:
        """The rows ``key`` as a new view of the same file."""
        return DiskImages(self.path, self.num_records, self.size, self.positions(key))

    def read(self, records: np.ndarray) -> np.ndarray:
        """Records of the file, (n, record) uint8, in the order given; one pread per contiguous run."""
        buffer = np.empty((len(records), self.record), dtype=np.uint8)
        if len(records) == 0:
            return buffer
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        order = np.argsort(records, kind="stable")
        ordered = records[order]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(ordered)], strict=True):
            view, offset = memoryview(buffer[start:stop]).cast("B"), int(ordered[start]) * self.record
            while len(view):  # a read may return less than asked (Linux caps one at about 2 GiB)
                got = os.preadv(self.fd, [view], offset)
                if got == 0:
                    raise DataError(f"{self.path}: ends before record {offset // self.record}; the cache was "
                                    "truncated after it was opened: run deepclust prepare again")
                view, offset = view[got:], offset + got
        if np.all(order[:-1] < order[1:]):
            return buffer
        out = np.empty_like(buffer)
        out[order] = buffer
        return out

    def __getitem__(self, key) -> torch.Tensor:
        single = isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.ndim == 0)
        records = self.positions([int(key)] if single else key)
        pixels = torch.from_numpy(self.read(records)).view(len(records), 3, self.size, self.size)
        return pixels[0] if single else pixels


@dataclass
class ImageData:
    """Images as uint8 (N, 3, S, S), in memory or on disk; ``labels`` int64 (N,) or None when the source has none."""

    images: torch.Tensor | DiskImages
    labels: torch.Tensor | None
    name: str
    classes: list[str] | None = None
    skipped: list[str] = field(default_factory=list)
    paths: list[str] | None = None  # image files relative to the folder given (folder sources only)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def subset(self, indices: torch.Tensor) -> ImageData:
        labels = None if self.labels is None else self.labels[indices]
        paths = None if self.paths is None else [self.paths[i] for i in indices.tolist()]
        images = self.images.subset(indices) if isinstance(self.images, DiskImages) else self.images[indices]
        return ImageData(images, labels, self.name, self.classes, self.skipped, paths)


class IndexedImages(torch.utils.data.Dataset):
    """Fetches whole batches of uint8 images by index, for a DataLoader with a batch sampler.

    Workers (if any) only fetch pixels; augmentation and every method hook run in the main
    process, so per-sample state (labels, memory banks) is never written in a forked worker.
    """

    def __init__(self, images: torch.Tensor | DiskImages):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], index


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


def load_digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = torch.from_numpy(digits.images).float().mul(255 / 16).unsqueeze(1)
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    # A fixed interleaved split: every 5th image is a test image (1438 train, 359 test).
    is_test = torch.arange(len(labels)) % 5 == 4
    if split not in ("train", "test"):
        raise DataError(f"digits has splits train and test, not {split!r}")
    keep = is_test if split == "test" else ~is_test
    return ImageData(images[keep], labels[keep], f"digits:{split}", [str(i) for i in range(10)])


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


def parse_spec(spec: str, default_split: str) -> tuple[str, str | None, str]:
    """'digits', 'digits:test', 'cifar10:/root', 'cifar10:/root:test', 'file.npz', 'dir' -> (kind, root, split)."""
    head, _, rest = spec.partition(":")
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


def long_tail_counts(class_sizes: list[int], ratio: float) -> list[int]:
    """Images kept per class for a long-tailed subset: class c of C keeps n_max * ratio^(-c / (C - 1)) (the
    exponential profile of the long-tail literature, e.g. CIFAR-10-LT), n_max the smallest class's size, so
    that the largest to smallest count is ``ratio`` up to rounding."""
    if ratio < 1:
        raise DataError(f"subset_imbalance={ratio} must be at least 1 (the largest to smallest class ratio)")
    top, last = min(class_sizes), max(len(class_sizes) - 1, 1)
    return [max(1, round(top * ratio ** (-c / last))) for c in range(len(class_sizes))]


def long_tail_subset(data: ImageData, ratio: float, seed: int = 0) -> ImageData:
    """A class-imbalanced subset (``long_tail_counts``; class 0 the largest), its images drawn with ``seed``."""
    if data.labels is None:
        raise DataError(f"{data.name}: subset_imbalance needs class labels (class subfolders or 'labels'); drop "
                        "subset_imbalance for unlabelled data")
    classes = data.labels.unique().tolist()
    members = [torch.nonzero(data.labels == c).flatten() for c in classes]
    gen = torch.Generator().manual_seed(seed)
    keep = [m[torch.randperm(m.numel(), generator=gen)[:n]]
            for m, n in zip(members, long_tail_counts([m.numel() for m in members], ratio), strict=True)]
    return data.subset(torch.cat(keep).sort().values)


def load_data(
    spec: str,
    split: str = "train",
    image_size: int | None = None,
    bad_images: str = "fail",
    subset: int | None = None,
    subset_seed: int = 0,
    subset_imbalance: float | None = None,
) -> ImageData:
    """Load any supported source as an in-memory ``ImageData``; see the module docstring.

    ``subset`` keeps a fixed random subset; ``subset_imbalance`` then a long-tailed one (``long_tail_subset``,
    ODC's protocol with ratio 64).
    """
    if bad_images not in ("fail", "skip"):
        raise DataError(f"bad_images must be 'fail' or 'skip', not {bad_images!r}")
    kind, root, split = parse_spec(spec, split)
    files = None
    if kind == "digits":
        data = load_digits(split)
    elif kind == "npz":
        path = Path(root)
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
        data = ImageData(images, labels, str(path))
    elif kind == "folder" and Path(root).is_dir() and is_cache(Path(root)):
        data = load_cache(Path(root), image_size)
    elif kind == "folder":
        path = Path(root)
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
            subset = None  # done before decoding: cheaper
        images, kept, skipped = decode_images(files, image_size, bad_images)
        labels = None if labels is None else torch.tensor([labels[i] for i in kept], dtype=torch.long)
        paths = [files[i].relative_to(path).as_posix() for i in kept]
        data = ImageData(images, labels, str(path), classes, skipped, paths)
    else:
        data = load_torchvision(kind, root, split)
    if subset is not None and subset < len(data):
        gen = torch.Generator().manual_seed(subset_seed)
        data = data.subset(torch.randperm(len(data), generator=gen)[:subset].sort().values)
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
    if kind == "folder":
        path = Path(root)
        if path.name == "train":
            for sibling in ("test", "val"):
                if (path.parent / sibling).is_dir():
                    return str(path.parent / sibling)
    return None


def load_train_test(spec: str, test_spec: str | None = None, image_size: int | None = None, bad_images: str = "fail",
                    subset: int | None = None, test_subset: int | None = None,
                    subset_imbalance: float | None = None) -> tuple[ImageData, ImageData | None]:
    """A training source and its test data (``test_spec``, else the split that belongs with ``spec``, else
    None), the test images at the training images' size. ``subset_imbalance`` applies to the training
    images only: the test set stays balanced."""
    train = load_data(spec, "train", image_size, bad_images, subset, subset_imbalance=subset_imbalance)
    test_spec = test_spec or default_test_spec(spec)
    test = load_data(test_spec, "test", image_size or train.image_size, bad_images, test_subset) if test_spec else None
    return train, test
