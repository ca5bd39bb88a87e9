"""A tiny Pascal VOC in the devkit's folder layout, generated: coloured shapes on noise, one colour a class, with
their XML annotations (boxes, difficult flags), palette PNG class masks with the 255 border, and the ImageSets
lists (Main/SPLIT.txt, Main/CLASS_SPLIT.txt with 1 / -1 / 0, Segmentation/SPLIT.txt). ``make_voc`` returns what
it wrote, so a test can compare the reader's output with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from deepclust.data.voc import VOC_CLASSES

# one saturated colour for each of the classes the generator uses (the first len(COLOURS) VOC classes)
COLOURS = [(230, 30, 30), (30, 200, 30), (40, 40, 230), (230, 210, 20), (200, 30, 200), (20, 210, 210)]


def make_voc(root: Path, year: str = "2007", sizes: dict[str, int] | None = None, width: int = 80, height: int = 64,
             classes: int = 4, seed: int = 0, difficult_every: int = 7) -> dict[str, list[dict]]:
    """Write ROOT/VOCdevkit/VOC{year}; returns {split: [{"id", "objects": [(label, box, difficult)]}]}.
    Every image holds one or two shapes of distinct classes (boxes 1-based inclusive, as VOC writes them);
    every ``difficult_every``-th object is marked difficult."""
    sizes = sizes or {"train": 12, "val": 8, "test": 12}
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    palette = [0] * 768
    for c in range(1, 21):
        palette[3 * c:3 * c + 3] = [(37 * c) % 256, (91 * c) % 256, (151 * c) % 256]
    palette[765:768] = [224, 224, 192]  # VOC's void colour
    written: dict[str, list[dict]] = {}
    counter, objects_seen = 0, 0
    for split, count in sizes.items():
        written[split] = []
        for _ in range(count):
            counter += 1
            image_id = f"{counter:06d}"
            pixels = rng.integers(0, 90, (height, width, 3)).astype(np.uint8)  # dark noise
            mask = np.zeros((height, width), dtype=np.uint8)
            labels = rng.choice(classes, size=int(rng.integers(1, 3)), replace=False)
            objects = []
            for i, label in enumerate(labels):
                w, h = int(rng.integers(18, 30)), int(rng.integers(16, 26))
                x0 = int(rng.integers(2, width // 2 - w // 2)) + i * (width // 2) - (i * 2)
                x0 = min(x0, width - w - 2)
                y0 = int(rng.integers(2, height - h - 2))
                pixels[y0:y0 + h, x0:x0 + w] = COLOURS[label]
                mask[y0:y0 + h, x0:x0 + w] = label + 1
                objects_seen += 1
                difficult = objects_seen % difficult_every == 0
                objects.append((int(label), (x0 + 1, y0 + 1, x0 + w, y0 + h), difficult))
            for _, (x1, y1, x2, y2), _ in objects:  # VOC's void border: the outline of each object
                ring = (slice(y1 - 1, y2), slice(x1 - 1, x2))
                edge = np.ones((y2 - y1 + 1, x2 - x1 + 1), dtype=bool)
                edge[1:-1, 1:-1] = False
                mask[ring][edge] = 255
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
