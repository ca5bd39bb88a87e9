"""Decoding phone-sized photos: images/s of the old path (full-resolution decode, then resize) against the new one
(``deepclust.data.decode_file``: DCT-scaled JPEG decode, EXIF orientation) on 1 and on all cores, at 32, 96 and
224 px, on generated 12-megapixel JPEGs, with the time a folder of 50,000 such files would take.

    OMP_NUM_THREADS=1 python -m benchmarks.decode [--files 6] [--repeat 2] [--sizes 32,96,224]

Each (path, size, workers) cell decodes the same files ``--repeat`` times in a fresh pool; the ratios within one
run are the figure to read on a shared machine (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from deepclust.data import decode_file
from deepclust.runtime import available_cores


def old_square(img: Image.Image, size: int) -> np.ndarray:
    """The path before issue 29 (also the tests' reference): RGB, shorter side to ``size`` (bilinear), centre crop."""
    rgb = img.convert("RGB")
    w, h = rgb.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    rgb = rgb.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)


def old_decode(path: str, size: int) -> np.ndarray:
    """The path before issue 29: decode every pixel, then ``old_square``."""
    with Image.open(path) as img:
        return old_square(img, size)


def new_decode(path: str, size: int) -> np.ndarray:
    return decode_file(path, size)[0]


def make_photos(folder: Path, n: int) -> list[str]:
    """n 4000 x 3000 JPEGs (quality 90): smooth gradients with fine noise, 2-4 MB each like a phone's."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:3000, 0:4000].astype(np.float32)
    paths = []
    for i in range(n):
        img = np.stack([128 + 100 * np.sin(x / (200 + 50 * i) + c) * np.cos(y / 300) for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape).astype(np.float32)
        paths.append(str(folder / f"photo_{i}.jpg"))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def rate(fn, paths: list[str], size: int, workers: int) -> float:
    """Images per second decoding ``paths`` with ``workers`` processes (1: in this process)."""
    start = time.perf_counter()
    if workers == 1:
        for p in paths:
            fn(p, size)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            list(pool.map(fn, paths, [size] * len(paths)))
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=6, help="generated 12-megapixel JPEGs")
    parser.add_argument("--repeat", type=int, default=2, help="times each file is decoded in a cell")
    parser.add_argument("--sizes", default="32,96,224", help="target sides, comma-separated")
    args = parser.parse_args()
    cores = available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.files)
        mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 2**20
        print(f"{args.files} JPEGs of 4000x3000 ({mb:.1f} MB each), {cores} cores, load average before "
              f"{os.getloadavg()[0]:.2f}\n")
        print("| size | cores | old images/s | new images/s | new / old | 50,000 files, old | 50,000 files, new | "
              "mean abs diff |")
        print("|---|---|---|---|---|---|---|---|")
        for size in map(int, args.sizes.split(",")):
            diff = np.mean([np.abs(old_decode(p, size).astype(int) - new_decode(p, size)).mean() for p in paths])
            for workers in sorted({1, cores}):
                old = rate(old_decode, paths * args.repeat, size, workers)
                new = rate(new_decode, paths * args.repeat, size, workers)
                print(f"| {size} | {workers} | {old:.1f} | {new:.1f} | {new / old:.1f}x | {50_000 / old / 60:.0f} min "
                      f"| {50_000 / new / 60:.1f} min | {diff:.2f} |")
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
