"""A small Pascal VOC in the devkit's folder layout, generated: shapes on noise, one shape a class (rectangle,
ellipse, triangle, cross, ring, diamond; a random colour each, so colour says nothing about the class), with their
XML annotations (tight boxes, every ``difficult_every``-th object marked difficult), palette PNG class masks whose
objects are outlined by VOC's 255 void border, and the ImageSets lists (Main/SPLIT.txt, Main/CLASS_SPLIT.txt with
1 / -1 / 0, Segmentation/SPLIT.txt). The tests and the VOC benchmark run on it; it checks the pipeline, it says
nothing about real VOC numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..data.voc import VOC_CLASSES, VOID

SHAPES = ("rectangle", "ellipse", "triangle", "cross", "ring", "diamond")


def shape_mask(kind: int, h: int, w: int) -> np.ndarray:
    """(h, w) bool pixels of shape ``kind`` filling an h x w box."""
    y, x = np.mgrid[0:h, 0:w]
    u, v = (x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1  # -1..1 across the box
    if kind == 0:
        return np.ones((h, w), dtype=bool)
    if kind == 1:
        return u ** 2 + v ** 2 <= 1
    if kind == 2:
        return (v + 1) / 2 >= np.abs(u)
    if kind == 3:
        return (np.abs(u) < 0.35) | (np.abs(v) < 0.35)
    if kind == 4:
        r = u ** 2 + v ** 2
        return (r <= 1) & (r >= 0.35)
    return np.abs(u) + np.abs(v) <= 1


def outline(region: np.ndarray) -> np.ndarray:
    """The pixels of ``region`` with a 4-neighbour outside it (VOC's void border lies on object outlines)."""
    padded = np.pad(region, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~inner


def make_voc(root: Path, year: str = "2007", sizes: dict[str, int] | None = None, width: int = 80, height: int = 64,
             classes: int = 4, seed: int = 0, difficult_every: int = 7) -> dict[str, list[dict]]:
    """Write ROOT/VOCdevkit/VOC{year}; returns {split: [{"id", "objects": [(label, box, difficult)], "mask"}]}
    (boxes 1-based inclusive, as VOC writes them), trainval included when train and val are. Every image holds one
    or two objects of distinct classes, the first ``classes`` VOC classes (at most 6)."""
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be 1-{len(SHAPES)}, got {classes}")
    sizes = sizes or {"train": 12, "val": 8, "test": 12}
    rng = np.random.default_rng(seed)
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    palette = [0] * 768
    for c in range(1, 21):
        palette[3 * c:3 * c + 3] = [(37 * c) % 256, (91 * c) % 256, (151 * c) % 256]
    palette[3 * VOID:3 * VOID + 3] = [224, 224, 192]  # VOC's void colour
    written: dict[str, list[dict]] = {}
    counter = objects_seen = 0
    for split, count in sizes.items():
        written[split] = []
        for _ in range(count):
            counter += 1
            image_id = f"{counter:06d}"
            pixels = rng.integers(0, 110, (height, width, 3)).astype(np.uint8)  # dark noise
            mask = np.zeros((height, width), dtype=np.uint8)
            labels = rng.choice(classes, size=int(rng.integers(1, 3)), replace=False)
            objects, regions = [], []
            for i, label in enumerate(labels):  # the first in the left half, the second in the right one
                w, h = int(rng.integers(width // 4, width // 2 - 4)), int(rng.integers(height // 4, height - 8))
                x0 = int(rng.integers(2, width // 2 - w + 1)) + i * (width // 2)
                y0 = int(rng.integers(2, height - h - 1))
                region = np.zeros((height, width), dtype=bool)
                region[y0:y0 + h, x0:x0 + w] = shape_mask(int(label), h, w)
                pixels[region] = rng.integers(120, 256, 3)
                mask[region] = label + 1
                ys, xs = np.nonzero(region)
                objects_seen += 1
                objects.append((int(label), (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1,
                                             int(ys.max()) + 1), objects_seen % difficult_every == 0))
                regions.append(region)
            for region in regions:
                mask[outline(region)] = VOID
            Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(base / "SegmentationClass" / f"{image_id}.png")
            xml = "".join(
                f"<object><name>{VOC_CLASSES[label]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
                f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
                for label, box, difficult in objects)
            (base / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><folder>VOC{year}</folder><filename>{image_id}.jpg</filename><size><width>{width}"
                f"</width><height>{height}</height><depth>3</depth></size><segmented>1</segmented>{xml}</annotation>")
            written[split].append({"id": image_id, "objects": objects, "mask": mask})
    splits = dict(written)
    if "train" in written and "val" in written:
        splits["trainval"] = written["train"] + written["val"]
    for split, items in splits.items():
        ids = "".join(f"{item['id']}\n" for item in items)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text(ids)
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(ids)
        for c, name in enumerate(VOC_CLASSES):
            flags = [max([-1] + [0 if d else 1 for label, _, d in item["objects"] if label == c]) for item in items]
            (base / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(
                "".join(f"{item['id']} {flag:2d}\n" for item, flag in zip(items, flags, strict=True)))
    return splits
