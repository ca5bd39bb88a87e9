"""Pascal VOC 2007 / 2012 read from a user's local VOCdevkit (never downloaded): ``voc2007:ROOT[:SPLIT]``.

ROOT may be the folder holding ``VOCdevkit``, the ``VOCdevkit`` folder itself, or its ``VOC2007`` / ``VOC2012``
folder. A split is one of train, val, trainval, test; without one, the training role gets trainval (VOC 2007,
the papers' SVM and detection training set) or train (VOC 2012, whose test annotations are not public) and the
test role gets test (2007) or val (2012).

Three views of one split, each from the devkit's own files:
  * image-level multi-labels (``VOCImageData.targets``, (N, 20) int8) from the XML annotations, with the
    devkit's classification convention: 1 the class has a non-difficult object in the image, 0 it has only
    "difficult" ones (ignored by the VOC classification metric), -1 it is absent;
  * boxes (``VOCRecord.objects``: 1-based inclusive pixel coordinates as written, with their difficult flag);
  * class masks (``SegmentationClass/ID.png``: class indices 0-20, 255 the void border), for the ids of
    ``ImageSets/Segmentation/SPLIT.txt``.

Our own reader rather than torchvision's ``VOCDetection`` / ``VOCSegmentation``: those insist on
ROOT/VOCdevkit/VOCyyyy, reject a 2012 "test" split by name, say only "Dataset not found or corrupted" for a missing
folder, and give PIL images one by one; here a missing file is named with its fix and the image-level labels are
decoded in one batch with the folder reader's decoder (``decode_images``).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .images import DataError, ImageData

log = logging.getLogger(__package__)

VOC_SOURCES = ("voc2007", "voc2012")
VOC_SPLITS = ("train", "val", "trainval", "test")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOID = 255  # the border and ambiguous pixels of a VOC class mask: ignored by training and the metric
DEFAULT_SPLITS = {"voc2007": {"train": "trainval", "test": "test"}, "voc2012": {"train": "train", "test": "val"}}
TASKS = ("classification", "detection", "segmentation")


@dataclass
class VOCObject:
    """One annotated object: its class index in VOC_CLASSES, its box (xmin, ymin, xmax, ymax) in the devkit's
    1-based inclusive pixel coordinates, and whether the annotators marked it difficult."""

    label: int
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass
class VOCRecord:
    """One image of a split: its id, image file, size, objects (from its XML) and class mask file (or None)."""

    image_id: str
    image: Path
    width: int
    height: int
    objects: list[VOCObject] = field(default_factory=list)
    mask: Path | None = None


@dataclass
class VOCImageData(ImageData):
    """``ImageData`` of a VOC split: no single label (``labels`` is None), the multi-labels in ``targets`` and
    the split's ``records`` (boxes, mask files) row for row."""

    targets: torch.Tensor | None = None
    records: list[VOCRecord] = field(default_factory=list)

    def subset(self, indices: torch.Tensor) -> VOCImageData:
        base = super().subset(indices)
        picked = indices.tolist()
        return VOCImageData(base.images, None, self.name, self.classes, self.skipped, base.paths, self.decoding,
                            targets=None if self.targets is None else self.targets[indices],
                            records=[self.records[i] for i in picked])


def parse_voc_spec(name: str, rest: str, default_split: str) -> tuple[str, str]:
    """(root, split) of the part after ``voc2007:``; an unknown split is a DataError naming the valid ones."""
    if not rest:
        raise DataError(f"'{name}': give the folder of your VOCdevkit, e.g. {name}:/data/VOCdevkit "
                        "(deepclust never downloads)")
    root, sep, split = rest.rpartition(":")
    if sep and split in VOC_SPLITS:
        return root, split
    if sep and not Path(rest).exists() and "/" not in split:  # ROOT:typo, not a path holding a colon
        raise DataError(f"{name}: unknown split {split!r}; choose one of {', '.join(VOC_SPLITS)} "
                        f"(e.g. {name}:{root}:trainval)")
    return rest, DEFAULT_SPLITS[name].get(default_split, default_split)


def year_folder(name: str, root: str | Path) -> Path:
    """The VOC2007 / VOC2012 folder under ``root`` (itself, ROOT/VOCyyyy or ROOT/VOCdevkit/VOCyyyy)."""
    year = f"VOC{name[3:]}"
    root = Path(root)
    for candidate in (root, root / year, root / "VOCdevkit" / year):
        if (candidate / "ImageSets").is_dir() and (candidate / "JPEGImages").is_dir():
            return candidate
    if not root.exists():
        raise DataError(f"{name}: no folder {root}; give the folder holding VOCdevkit/{year} (the unpacked VOC "
                        f"tar files; deepclust never downloads)")
    raise DataError(f"{name}: {root} holds no {year} devkit (looked for ImageSets/ and JPEGImages/ in {root}, "
                    f"{root / year} and {root / 'VOCdevkit' / year}); give the folder the VOC tar files were unpacked "
                    "into")


def split_ids(base: Path, split: str, task: str) -> list[str]:
    """The image ids of ImageSets/Main/SPLIT.txt (Segmentation/SPLIT.txt for segmentation)."""
    folder = "Segmentation" if task == "segmentation" else "Main"
    path = base / "ImageSets" / folder / f"{split}.txt"
    if not path.is_file():
        present = sorted(p.stem for p in (base / "ImageSets" / folder).glob("*.txt") if "_" not in p.stem)
        raise DataError(f"{base.name} has no {split!r} split for {task} (no {path}); its {folder} splits: "
                        f"{', '.join(present) or 'none'}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path} lists no images")
    return ids


def read_annotation(path: Path) -> tuple[int, int, list[VOCObject]]:
    """(width, height, objects) of one VOC XML file; an unknown class name is a DataError."""
    if not path.is_file():
        raise DataError(f"no annotation {path}; the split lists an image whose XML is missing (an incomplete "
                        "unpacking of the VOC tar files?)")
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path} is not readable XML ({err})") from err
    size = tree.find("size")
    width = int(size.findtext("width", "0")) if size is not None else 0
    height = int(size.findtext("height", "0")) if size is not None else 0
    objects = []
    for obj in tree.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataError(f"{path}: object class {name!r} is none of the 20 VOC classes")
        bndbox = obj.find("bndbox")
        box = tuple(float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(VOCObject(VOC_CLASSES.index(name), box, (obj.findtext("difficult") or "0").strip() == "1"))
    return width, height, objects


def read_voc(name: str, root: str | Path, split: str, task: str = "classification") -> list[VOCRecord]:
    """The records of one split: images, sizes and objects for every task, class masks for segmentation."""
    if name not in VOC_SOURCES:
        raise DataError(f"unknown VOC source {name!r}; choose one of {', '.join(VOC_SOURCES)}")
    if split not in VOC_SPLITS:
        raise DataError(f"{name}: unknown split {split!r}; choose one of {', '.join(VOC_SPLITS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    base = year_folder(name, root)
    records = []
    for image_id in split_ids(base, split, task):
        image = base / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise DataError(f"no image {image} (listed in {base.name}'s {split} split)")
        width, height, objects = read_annotation(base / "Annotations" / f"{image_id}.xml")
        mask = None
        if task == "segmentation":
            mask = base / "SegmentationClass" / f"{image_id}.png"
            if not mask.is_file():
                raise DataError(f"no class mask {mask} (listed in {base.name}'s segmentation {split} split)")
        records.append(VOCRecord(image_id, image, width, height, objects, mask))
    return records


def image_targets(records: list[VOCRecord]) -> torch.Tensor:
    """(N, 20) int8 multi-labels: 1 a non-difficult object of the class, 0 only difficult ones, -1 none."""
    targets = np.full((len(records), len(VOC_CLASSES)), -1, dtype=np.int8)
    for row, record in enumerate(records):
        for obj in record.objects:
            targets[row, obj.label] = max(targets[row, obj.label], 0 if obj.difficult else 1)
    return torch.from_numpy(targets)


def read_mask(path: Path) -> np.ndarray:
    """A class mask as (H, W) uint8 indices (a palette PNG's indices, as the devkit writes them)."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise DataError(f"{path} is a {img.mode} image; a VOC class mask is a palette (P) or grey (L) PNG of "
                            "class indices")
        return np.asarray(img, dtype=np.uint8).copy()


def load_voc(name: str, root: str, split: str, image_size: int | None, bad_images: str = "fail",
             workers: int | None = None, backbone: str | None = None) -> VOCImageData:
    """A split's images, decoded as the folder reader does (shorter side to ``image_size``, centre crop), with
    their multi-labels; unreadable images are refused (VOC's are all readable)."""
    from .folder import decode_images

    records = read_voc(name, root, split)
    images, kept, skipped = decode_images([r.image for r in records], image_size, bad_images, workers=workers,
                                          backbone=backbone)
    records = [records[i] for i in kept]
    what = f"{name}:{year_folder(name, root)}:{split}"
    return VOCImageData(images, None, what, list(VOC_CLASSES), skipped, [r.image.name for r in records],
                        targets=image_targets(records), records=records)
