"""Labels from a file: ``--labels labels.csv`` (``path,label`` or ``index,label``, as the cluster browser exports it)
replaces a source's labels, so ``eval``, ``report`` and ``train --method supervised`` use the names a person gave.

Images without a row are left out (the browser leaves excluded images out of labels.csv); a row naming no image of
the source is an error (the file belongs to another folder). For a class-folder source, how often the file's label
equals the folder's class is logged and kept as ``labels_agreement``: the accuracy of the given labels, which for
clusters named by their majority class is the clusters' purity.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from .images import DataError, ImageData

log = logging.getLogger(__package__)


def read_labels_csv(path: str | Path) -> tuple[str, dict[str, str]]:
    """(key column, {key: label}) of a labels CSV; the key column is ``path`` or ``index``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no labels file {path}; --labels takes a CSV of path,label (the cluster browser's Export "
                        "labels.csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"labels file {path} is empty; it needs a header path,label and one row per image")
    header = [h.strip() for h in rows[0]]
    key = "path" if "path" in header else "index" if "index" in header else None
    if key is None or "label" not in header:
        raise DataError(f"labels file {path} has the header {','.join(header)!r}; it needs the columns path (or "
                        "index) and label, as the cluster browser exports them")
    k, v = header.index(key), header.index("label")
    mapping: dict[str, str] = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) <= max(k, v) or not row[v].strip():
            raise DataError(f"{path}, line {number}: no label; every row needs a {key} and a label")
        if row[k] in mapping:
            raise DataError(f"{path}, line {number}: {key} {row[k]!r} has a second row; give each image one label")
        mapping[row[k]] = row[v].strip()
    if not mapping:
        raise DataError(f"labels file {path} has a header but 0 rows: no image is labelled")
    return key, mapping


def apply_labels_file(data: ImageData, file: str | Path) -> ImageData:
    """``data`` with the labels of ``file``; images it does not list are left out (logged)."""
    key, mapping = read_labels_csv(file)
    if key == "path":
        if data.paths is None:
            raise DataError(f"{file} labels images by path, but {data.name} is not a folder of image files; give a "
                            "folder as --data, or a labels file with an index column")
        keys = data.paths
    else:
        keys = [str(i) for i in range(len(data))]
    known = set(keys) | set(data.skipped)
    unknown = [k for k in mapping if k not in known]
    if unknown:
        raise DataError(f"{len(unknown)} of the {len(mapping)} rows of {file} name no image of {data.name} (e.g. "
                        f"{unknown[0]!r}); --labels must belong to this --data (its paths relative to the folder)")
    kept = [i for i, k in enumerate(keys) if k in mapping]
    if not kept:
        raise DataError(f"{file} labels none of the {len(data)} images of {data.name}")
    names = sorted({mapping[keys[i]] for i in kept}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    position = {name: c for c, name in enumerate(names)}
    left_out = len(data) - len(kept)
    if left_out:
        data = data.subset(torch.tensor(kept, dtype=torch.long))
        log.info("%s: %d of %d images have no row in %s and are left out", data.name, left_out, left_out + len(kept),
                 file)
        keys = [keys[i] for i in kept]
    own = None
    if data.labels is not None and data.classes:  # class folders: how often the given label is the folder's class
        own = [data.classes[int(c)] for c in data.labels]
    labels = torch.tensor([position[mapping[k]] for k in keys], dtype=torch.long)
    out = ImageData(data.images, labels, data.name, names, data.skipped, data.paths, data.decoding)
    if own is not None:
        out.labels_agreement = sum(a == mapping[k] for a, k in zip(own, keys, strict=True)) / len(keys)
        log.info("labels from %s: %d images, %d classes; they equal the class folders' on %.2f%% of the images (for "
                 "clusters named by their majority class: their purity)", file, len(keys), len(names),
                 100 * out.labels_agreement)
    else:
        log.info("labels from %s: %d images, %d classes", file, len(keys), len(names))
    return out


def align_classes(train: ImageData, test: ImageData) -> ImageData:
    """``test`` with its labels renumbered onto ``train``'s class names (a class of its own, unknown to ``train``,
    gets a new number after them), so that a label given by name in a file and a class folder's name agree."""
    if test.labels is None or train.classes is None:
        return test
    names = test.classes or [str(i) for i in range(int(test.labels.max()) + 1)]
    union = list(train.classes) + [n for n in dict.fromkeys(names) if n not in train.classes]
    position = {name: c for c, name in enumerate(union)}
    remap = torch.tensor([position[n] for n in names], dtype=torch.long)
    unseen = [n for n in names if n not in train.classes]
    if unseen:
        log.info("test classes without a training label of that name (never predicted right): %s",
                 ", ".join(unseen[:10]))
    return ImageData(test.images, remap[test.labels], test.name, union, test.skipped, test.paths, test.decoding)
