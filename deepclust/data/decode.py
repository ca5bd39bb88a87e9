"""Decoding image files to uint8 squares: EXIF orientation applied, JPEGs decoded at reduced scale (libjpeg's DCT
scaling) when the target is smaller, spread over a process pool, and every odd file handled or refused by kind.

Each file is decoded on its own by ``decode_file`` and the results are put back in file order, so the pixels are
the same bytes whatever the number of workers. Apart from the DCT scaling (which only changes how the image is
resampled) and the orientation, the pixels are those of the previous one-core path: convert to RGB, shorter side
resized to S (bilinear), centre crop.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..runtime import available_cores
from .images import DataError

log = logging.getLogger(__package__)

# What can go wrong with one file: refused (with bad_images=fail the run stops, naming the file; with skip it is
# left out and counted), or handled (converted, and counted in the summary).
SKIPPED_KINDS = {
    "unreadable": "cannot read image {path}, truncated or corrupt: {err}. Fix or remove it, or pass "
                  "bad_images=skip to skip unreadable images (they are counted and logged)",
    "not an image": "cannot read image {path}: it is not an image file PIL can read ({err}). Remove it from the "
                    "folder, or pass bad_images=skip to skip such files (they are counted and logged)",
    "too large": "refused image {path}: {err} Downscale it if it is genuine, or pass bad_images=skip to skip such "
                 "images",
}
HANDLED_KINDS = ("16/32-bit (rescaled to 8 bits)", "CMYK (converted to RGB)", "animated (first frame)",
                 "smaller than the image size (upscaled)", "EXIF-rotated")
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Below this many files a pool costs more (starting workers, copying results back) than it saves.
POOL_MIN_FILES = 64


class BadImage(Exception):
    """One file that cannot be decoded: ``kind`` is a key of SKIPPED_KINDS, ``err`` what PIL said."""

    def __init__(self, kind: str, err: str):
        super().__init__(f"{kind}: {err}")
        self.kind, self.err = kind, err


def decode_file(path: str | Path, size: int) -> tuple[np.ndarray, list[str]]:
    """One file as (size, size, 3) uint8, upright (EXIF orientation applied), and the HANDLED_KINDS it was.

    A JPEG larger than the target is decoded at 1/2, 1/4 or 1/8 scale (``draft``: libjpeg's DCT scaling, never
    below ``size`` on either side), which is 5-20x faster on a phone photo. Raises BadImage."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    notes: list[str] = []
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise BadImage("too large", str(err)) from err
    except UnidentifiedImageError as err:
        raise BadImage("not an image", str(err)) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage("unreadable", str(err)) from err
    with img:
        try:
            if getattr(img, "is_animated", False):
                notes.append(HANDLED_KINDS[2])  # PIL is positioned on the first frame
            if img.format == "JPEG" and min(img.size) >= 2 * size:
                img.draft("RGB", (size, size))  # scales only; the mode stays
            if img.getexif().get(0x0112, 1) in range(2, 9):  # a turned or mirrored photo
                ImageOps.exif_transpose(img, in_place=True)  # loads the pixels; a truncated file raises here
                notes.append(HANDLED_KINDS[4])
            else:
                img.load()
            if img.mode in HIGH_BIT_MODES:  # 16/32-bit grayscale: rescale, don't clip
                wide = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(1.0, float(wide.max()))
                img = Image.fromarray(np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
                notes.append(HANDLED_KINDS[0])
            elif img.mode == "CMYK":
                notes.append(HANDLED_KINDS[1])
            rgb = img.convert("RGB")
        except Image.DecompressionBombError as err:
            raise BadImage("too large", str(err)) from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL raises these for corrupt files
            raise BadImage("unreadable", str(err)) from err
    w, h = rgb.size
    if min(w, h) < size:
        notes.append(HANDLED_KINDS[3])
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        rgb = rgb.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb, dtype=np.uint8), notes


def decode_chunk(paths: list[str], size: int) -> tuple[np.ndarray, list[int], list[tuple[int, str, str]], list[str]]:
    """Decode files; returns (kept images (n, S, S, 3), their positions, failures (position, kind, err), notes as
    "kind\\tpath"). Runs in a pool worker: plain types only, nothing of torch."""
    images, kept, failed, notes = [], [], [], []
    for i, path in enumerate(paths):
        try:
            pixels, kinds = decode_file(path, size)
        except BadImage as bad:
            failed.append((i, bad.kind, bad.err))
            continue
        images.append(pixels)
        kept.append(i)
        notes += [f"{kind}\t{path}" for kind in kinds]
    array = np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)
    return array, kept, failed, notes


@dataclass
class DecodeReport:
    """What decoding met, by kind: files skipped (SKIPPED_KINDS) and files converted (HANDLED_KINDS), each with
    its count and a first example."""

    skipped: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, path: str) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, path)

    def summary(self) -> str:
        """e.g. 'skipped 1 unreadable (e.g. x.jpg), 1 not an image (...); handled 2 animated (first frame) ...'."""
        def part(kinds) -> str:
            return ", ".join(f"{self.counts[k]} {k} (e.g. {Path(self.examples[k]).name})" for k in kinds
                             if self.counts[k])
        skipped, handled = part(SKIPPED_KINDS), part(HANDLED_KINDS)
        return "; ".join(s for s in (skipped and f"skipped {skipped}", handled and f"handled {handled}") if s)


def decode_workers(requested: int | None, files: int) -> int:
    """Worker processes for ``files`` files: ``requested``, else one per core this process may use; 1 (no pool)
    for a few files."""
    if requested is not None:
        if requested < 1:
            raise DataError(f"decode workers must be at least 1, got {requested}")
        return requested
    return 1 if files < POOL_MIN_FILES else available_cores()


class Decoder:
    """Decodes lists of files to uint8 (n, 3, S, S), in file order, with a pool of ``workers`` processes (None:
    one per core) kept across calls (``deepclust prepare`` decodes a chunk at a time). Use as a context manager."""

    def __init__(self, size: int, bad_images: str, workers: int | None = None):
        self.size, self.bad_images, self.workers = size, bad_images, workers
        self.report = DecodeReport()
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def start_pool(self, workers: int) -> ProcessPoolExecutor:
        if self.pool is None:
            # fork: a worker starts in milliseconds with the modules loaded (spawn re-imports torch, seconds each);
            # workers touch only PIL and numpy, never torch's threads. Elsewhere than Linux, spawn.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
        return self.pool

    def decode(self, files: list[Path]) -> tuple[torch.Tensor, list[int]]:
        """Images of ``files`` that could be read (uint8 (n, 3, S, S)) and their positions in ``files``. A bad file
        raises DataError naming it and its kind (bad_images=fail) or is skipped and counted (skip)."""
        size, n = self.size, len(files)
        workers = decode_workers(self.workers, n)
        paths = [str(p) for p in files]
        out = torch.empty((n, 3, size, size), dtype=torch.uint8)
        kept: list[int] = []
        step = 256 if workers == 1 else max(1, min(256, -(-n // (8 * workers))))  # about 8 tasks a worker
        tasks = [paths[s:s + step] for s in range(0, n, step)]
        if workers == 1:
            results = (decode_chunk(task, size) for task in tasks)
        else:  # in order, each as soon as it and those before it are done
            results = self.start_pool(workers).map(decode_chunk, tasks, [size] * len(tasks))
        with tqdm(total=n, desc="decoding images", unit="img", leave=False, mininterval=2, disable=n < 5000) as bar:
            try:
                for start, (array, chunk_kept, failed, notes) in zip(range(0, n, step), results, strict=True):
                    bar.update(min(step, n - start))
                    for i, kind, err in failed:
                        path = paths[start + i]
                        if self.bad_images == "fail":
                            raise DataError(SKIPPED_KINDS[kind].format(path=path, err=err))
                        self.report.skipped.append(path)
                        self.report.add(kind, path)
                    for note in notes:
                        self.report.add(*note.split("\t", 1))
                    if chunk_kept:
                        out[len(kept):len(kept) + len(chunk_kept)] = torch.from_numpy(array).permute(0, 3, 1, 2)
                    kept += [start + i for i in chunk_kept]
            except BrokenProcessPool as err:  # a worker killed (the OOM killer) or crashed inside a decoder
                raise DataError(f"a process decoding {files[0].parent} died ({err}); if memory ran out, decode "
                                f"with fewer workers or decode once into a cache: `deepclust prepare SOURCE --out "
                                f"CACHE --size {size} --workers 1`") from err
        return out[:len(kept)], kept
