"""``deepclust prepare``: decode a data source once into a cache on disk, for data bigger than memory.

The cache is a folder: ``images.u8`` (N fixed-size records of 3 x S x S uint8, the layout ``DiskImages``
reads), ``labels.npy`` (if labelled), ``files.json`` (relative paths, skipped images) and ``cache.json``, the
header, written last. Images are decoded, resized and appended a chunk at a time, so memory holds one chunk.
Everything is written under a hidden temporary name and renamed at the end: an interrupted prepare never
leaves a folder at ``--out`` (its leftover has no header, and loading it says so).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import (
    CACHE_FILES,
    CACHE_FORMAT,
    CACHE_HEADER,
    CACHE_LABELS,
    CACHE_PIXELS,
    CACHE_VERSION,
    DataError,
    Decoder,
    is_cache,
    labels_tensor,
    list_image_folder,
    load_data,
    log_report,
    parse_spec,
    read_npy_header,
    square_uint8,
    to_nchw_uint8,
)
from ..data.decode import decode_workers

log = logging.getLogger(__name__)


@dataclass
class Chunks:
    """A source read a chunk at a time: ``chunks()`` yields (uint8 (n, 3, size, size), labels or None, paths or
    None); ``skipped`` fills up as it goes."""

    spec: str
    split: str
    size: int
    bad_images: str
    chunk: int
    workers: int | None = None  # decoding processes of a folder (None: one per core)
    total: int | None = None
    classes: list[str] | None = None
    skipped: list[str] = field(default_factory=list)
    decoding: dict[str, int] = field(default_factory=dict)  # a folder's files skipped or converted, by kind

    def chunks(self) -> Iterator[tuple[torch.Tensor, list[int] | None, list[str] | None]]:
        kind, root, split = parse_spec(self.spec, self.split)
        if kind == "folder" and Path(root).is_dir() and not is_cache(Path(root)):
            yield from self.folder(Path(root))
        elif kind == "npz" and Path(root).is_file():
            yield from self.npz(Path(root))
        else:  # digits, torchvision (both in memory already), an existing cache (re-sized), or a missing path
            data = load_data(self.spec, split, None, self.bad_images)
            self.total, self.classes = len(data), data.classes
            for start in range(0, len(data), self.chunk):
                labels = None if data.labels is None else data.labels[start:start + self.chunk].tolist()
                paths = None if data.paths is None else data.paths[start:start + self.chunk]
                yield square_uint8(data.images[start:start + self.chunk], self.size), labels, paths

    def folder(self, root: Path):
        """A chunk of files at a time, decoded by one pool of workers kept for the whole folder."""
        files, labels, self.classes = list_image_folder(root)
        self.total = len(files)
        with Decoder(self.size, self.bad_images, decode_workers(self.workers, len(files))) as decoder:
            for start in range(0, len(files), self.chunk):
                part = files[start:start + self.chunk]
                images, kept = decoder.decode(part)
                yield (images, None if labels is None else [labels[start + i] for i in kept],
                       [part[i].relative_to(root).as_posix() for i in kept])
        self.skipped, self.decoding = decoder.report.skipped, dict(decoder.report.counts)
        log_report(decoder.report)

    def npz(self, path: Path):
        """Rows of the npz's 'images' streamed from the archive (an npz member cannot be memory-mapped)."""
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz:
                raise DataError(f"{path} has no 'images' array (it has {sorted(npz.files)}); save the images "
                                "under the key 'images'")
            raw_labels = npz["labels"] if "labels" in npz else None
        with zipfile.ZipFile(path) as archive, archive.open("images.npy") as f:
            shape, fortran, dtype = read_npy_header(f)
            labels = labels_tensor(raw_labels, shape[0] if shape else 0, str(path))
            if fortran or dtype.hasobject or len(shape) < 3:  # rare layouts: to_nchw_uint8 checks them whole
                rows = (np.load(path, allow_pickle=False)["images"],)
            else:
                rows = stream_rows(f, shape, dtype, self.chunk)
            self.total = shape[0]
            start = 0
            for array in rows:
                for part in range(0, len(array), self.chunk):
                    images = to_nchw_uint8(array[part:part + self.chunk], str(path))
                    stop = start + len(images)
                    yield (square_uint8(images, self.size), None if labels is None else labels[start:stop].tolist(),
                           None)
                    start = stop


def stream_rows(f, shape: tuple[int, ...], dtype: np.dtype, chunk: int) -> Iterator[np.ndarray]:
    row = int(np.prod(shape[1:])) * dtype.itemsize
    for start in range(0, shape[0], chunk):
        n = min(chunk, shape[0] - start)
        data = np.empty(n * row, dtype=np.uint8)
        view, got = memoryview(data), 0
        while got < len(data):
            more = f.readinto(view[got:])
            if not more:
                raise DataError(f"the npz's images array ends after {start + got // row} of {shape[0]} rows; "
                                "save the npz again")
            got += more
        yield data.view(dtype).reshape(n, *shape[1:])


def prepare_cache(spec: str, out: Path, size: int, split: str = "train", bad_images: str = "fail",
                  chunk: int = 2048, workers: int | None = None) -> dict:
    """Write the cache of ``spec`` (any source ``load_data`` reads) at ``size`` x ``size`` into ``out``; returns
    its header. ``bad_images`` as for training: fail, or skip (counted in the header, by kind, and listed in
    files.json). A folder is decoded by ``workers`` processes (None: one per core), the same bytes whatever
    their number."""
    if bad_images not in ("fail", "skip"):
        raise DataError(f"bad_images must be 'fail' or 'skip', not {bad_images!r}")
    if size < 1 or chunk < 1:
        raise DataError(f"--size and --chunk must be at least 1, got {size} and {chunk}")
    out = Path(out)
    if out.exists():
        raise DataError(f"{out} exists; give a new --out (a cache is never overwritten in place) or delete it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    source = Chunks(spec, split, size, bad_images, chunk, workers)
    n, labels, paths = 0, [], []
    try:
        with open(tmp / CACHE_PIXELS, "wb") as f, tqdm(desc=f"preparing {out}", unit="img", mininterval=2) as bar:
            for images, chunk_labels, chunk_paths in source.chunks():
                bar.total = source.total
                f.write(images.contiguous().numpy().data)
                n += len(images)
                labels += chunk_labels or []
                paths += chunk_paths or []
                bar.update(len(images))
            f.flush()
            os.fsync(f.fileno())
        if n == 0:
            raise DataError(f"none of the images of {spec} could be read (first: {source.skipped[:1]})")
        if source.skipped and not source.decoding:  # a folder's were logged by kind as it finished
            log.warning("skipped %d unreadable image(s), e.g. %s", len(source.skipped), source.skipped[0])
        if labels:
            np.save(tmp / CACHE_LABELS, np.asarray(labels, dtype=np.int64))
        (tmp / CACHE_FILES).write_text(json.dumps({"paths": paths or None, "skipped": source.skipped}))
        header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "num_images": n, "image_size": size,
                  "layout": "N x 3 x S x S uint8, row-major, one record per image", "source": spec, "split": split,
                  "bad_images": bad_images, "skipped": len(source.skipped), "decoding": source.decoding,
                  "labelled": bool(labels),
                  "classes": source.classes}
        with open(tmp / CACHE_HEADER, "w") as f:
            json.dump(header, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        os.rename(tmp, out)  # atomic: --out appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return header


def run(args: argparse.Namespace) -> int:
    header = prepare_cache(args.data, Path(args.out), args.size, args.split, args.bad_images, args.chunk,
                           args.workers)
    n, size = header["num_images"], header["image_size"]
    skipped = f", {header['skipped']} unreadable image(s) skipped" if header["skipped"] else ""
    gib = n * 3 * size * size / 2**30
    on_disk = f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"
    labelled = ", labelled" if header["labelled"] else ""
    print(f"wrote {args.out}: {n} images of {size}x{size} ({on_disk} on disk){labelled}{skipped}; train with "
          f"--data {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="decode a dataset once into a cache on disk (for data bigger than memory)",
                       description="Decode DATA (any --data source) a chunk at a time (a folder on every core, "
                       "each photo upright by its EXIF orientation), resize every image to SIZE x SIZE (shorter side, "
                       "centre crop) and write a cache folder that --data CACHE reads from disk by index, never "
                       "holding the whole set in memory.")
    p.add_argument("data", help="digits | DIR | FILE.npz | NAME:ROOT[:SPLIT] | CACHE")
    p.add_argument("--out", required=True, help="the cache folder to create (must not exist)")
    p.add_argument("--size", type=int, required=True, help="image side in pixels")
    p.add_argument("--split", default="train", help="split of digits / torchvision sources")
    p.add_argument("--bad-images", choices=("fail", "skip"), default="fail",
                   help="an unreadable, non-image or oversized file: fail naming it, or skip it (counted by kind)")
    p.add_argument("--chunk", type=int, default=2048, help="images decoded and held at a time")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding a folder's files (default: one per core; the cache is the same bytes "
                        "whatever the number)")
