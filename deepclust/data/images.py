"""What a loaded data source is: ``ImageData`` (uint8 images, labels), its images in memory or on disk
(``DiskImages``, a prepared cache's rows read when indexed), ``IndexedImages`` for a DataLoader, and ``DataError``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A data source is missing, empty or unreadable. The message names the problem and the fix."""


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
    decoding: dict[str, int] = field(default_factory=dict)  # files skipped or converted, by kind (folder sources)
    labels_agreement: float | None = None  # --labels FILE on class folders: share of the file's labels equal to them

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
        return ImageData(images, labels, self.name, self.classes, self.skipped, paths, self.decoding)


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
