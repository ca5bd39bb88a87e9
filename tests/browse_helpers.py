"""Helpers of tests/test_browse.py: a small generated image folder, its clusters CSV, and headless Chromium."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200)}


def make_class_folder(root: Path, per_class: int = 6, seed: int = 0) -> list[str]:
    """root/<colour>/NN.png: a colour field with a white bar whose position varies; sizes and aspect ratios vary
    too (the thumbnails crop them square). Returns the paths relative to root, sorted."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(24, 60)), int(rng.integers(24, 60))
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
            row = (i * h) // per_class
            pixels[row:row + max(2, h // 8)] = 250
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
            paths.append(f"{name}/{i:02d}.png")
    return sorted(paths)


def write_clusters_csv(path: Path, rows: list[tuple[str, int, float, float, str]]) -> None:
    """rows of (path, cluster, distance, confidence, label), as deepclust cluster writes them."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "cluster", "distance", "confidence", "label"])
        for p, c, d, conf, label in rows:
            out.writerow([p, c, f"{d:.6f}", f"{conf:.6f}", label])


def chromium_executable() -> str:
    """The system's Chromium (Debian's chromium package; .ci/run installs it): Playwright never downloads one."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no chromium on PATH: apt-get install -y chromium (.ci/run does this)")


def read_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))
