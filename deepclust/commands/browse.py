"""``deepclust browse CLUSTERS.csv --data D --out DIR``: a static page to look at clusters, name, merge and fix them.

The page is ``DIR/index.html`` with its CSS and JS copied from ``deepclust/pages/browse/``, the data in
``DIR/clusters.js`` (a script that sets a global: Chromium refuses ``fetch()`` of a local file under file://) and
the thumbnails in JPEG sprite sheets ``DIR/tiles/sheet-NNNNN.jpg``, each image one cell, in the order the page
shows them (cluster by cluster, most central first), so that a cluster's first page is one or two files.
Any CSV with ``path`` (or ``index``) and ``cluster`` columns works: clusters made by another tool too.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..data import DataError, load_data

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).resolve().parent.parent / "pages" / "browse"
PAGE_FILES = ("index.html", "browse.css", "browse.js")
SHEET_COLUMNS = 10  # a sheet of 10 x 10 tiles: 640 x 640 px at 64 px, about 85 KiB of JPEG (CIFAR-10)
SHEET_TILES = SHEET_COLUMNS * SHEET_COLUMNS
MAP_NEIGHBOURS = 6  # clusters listed as a cluster's nearest in the page


@dataclass
class ClusterTable:
    """A clusters CSV as read: its header and cells as text (the page exports them again), the key column
    (``path`` or ``index``) and the parsed columns."""

    file: Path
    digest: str
    header: list[str]
    cells: list[list[str]]
    key: str
    keys: list[str]
    cluster: np.ndarray
    distance: np.ndarray | None = None
    confidence: np.ndarray | None = None
    label: list[str] | None = None
    names: list[str] | None = None  # a ``name`` column (the page's edited CSV): a folder per given name

    def __len__(self) -> int:
        return len(self.keys)


def parse_float(text: str) -> float:
    try:
        return float(text) if text.strip() else math.nan
    except ValueError:
        return math.nan


def read_clusters_csv(path: Path) -> ClusterTable:
    """Read and check a clusters CSV; every problem is a DataError naming it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no file {path}; give the CSV that deepclust cluster --out wrote (or any CSV with "
                        "columns path or index, and cluster)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not a UTF-8 text file ({err.reason} at byte {err.start}); give a clusters CSV"
                        ) from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path} is empty; it needs a header with columns path (or index) and cluster, and one "
                        "row per image")
    header = [h.strip() for h in rows[0]]
    key = "path" if "path" in header else "index" if "index" in header else None
    if key is None or "cluster" not in header:
        missing = [c for c, ok in (("path (or index)", key is not None), ("cluster", "cluster" in header)) if not ok]
        raise DataError(f"{path} lacks the column(s) {' and '.join(missing)}; its header is {','.join(header)!r}. "
                        "A clusters CSV needs path (relative to --data) or index, and cluster, as deepclust "
                        "cluster --out writes")
    cells = rows[1:]
    if not cells:
        raise DataError(f"{path} has a header but 0 rows: there is nothing to browse; write it again with "
                        "deepclust cluster --out (did the clustering run on an empty folder?)")
    width = len(header)
    for number, row in enumerate(cells, start=2):
        if len(row) != width:
            raise DataError(f"{path}, line {number}: {len(row)} cells where the header has {width}; fix or "
                            "rewrite the CSV")
    column = {name: i for i, name in enumerate(header)}
    clusters = np.empty(len(cells), dtype=np.int64)
    for i, row in enumerate(cells):
        try:
            clusters[i] = int(row[column["cluster"]])
        except ValueError:
            raise DataError(f"{path}, line {i + 2}: cluster {row[column['cluster']]!r} is not an integer; the "
                            "cluster column holds cluster numbers (-1: in no cluster)") from None
    keys = [row[column[key]] for row in cells]
    if key == "index":
        for i, value in enumerate(keys):
            if not value.strip().isdigit():
                raise DataError(f"{path}, line {i + 2}: index {value!r} is not a row number of --data")
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise DataError(f"{path}: {key} {dup!r} appears more than once; each image must have one row")

    def floats(name: str) -> np.ndarray | None:
        return None if name not in column else np.array([parse_float(r[column[name]]) for r in cells])

    def texts(name: str) -> list[str] | None:
        return None if name not in column else [r[column[name]] for r in cells]

    return ClusterTable(path, hashlib.sha256(raw).hexdigest(), header, cells, key, keys, clusters,
                        floats("distance"), floats("confidence"), texts("label"), texts("name"))


def display_order(table: ClusterTable) -> np.ndarray:
    """Rows cluster by cluster (ascending), each from the most central (smallest distance) to the least
    confident; without a distance by confidence, descending; without either, in the CSV's order."""
    if table.distance is not None:
        within = np.where(np.isnan(table.distance), np.inf, table.distance)
    elif table.confidence is not None:
        within = np.where(np.isnan(table.confidence), np.inf, -table.confidence)
    else:
        within = np.arange(len(table), dtype=np.float64)
    return np.lexsort((np.arange(len(table)), within, table.cluster))


def square_thumbnail(image, tile: int):
    """An RGB PIL image centre-cropped to a square and resized to ``tile`` px."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.resize((tile, tile), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                        reducing_gap=2.0 if side > 4 * tile else None)


def placeholder_tile(tile: int):
    """The tile of an image that could not be read: grey with a red cross, so it is seen, not mistaken."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (tile, tile), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    draw.line((4, 4, tile - 5, tile - 5), fill=(190, 30, 30), width=max(2, tile // 16))
    draw.line((4, tile - 5, tile - 5, 4), fill=(190, 30, 30), width=max(2, tile // 16))
    return image


def file_tile(path: str | None, tile: int):
    """(tile, None) for a readable image file, (placeholder, why) for a missing or unreadable one."""
    from PIL import Image, ImageOps

    if path is None:
        return placeholder_tile(tile), "missing"
    try:
        with Image.open(path) as img:
            img.draft("RGB", (tile, tile))  # a JPEG decodes at 1/2..1/8 scale when that is still >= tile
            img = ImageOps.exif_transpose(img)
            return square_thumbnail(img, tile), None
    except Exception:  # noqa: BLE001 - PIL raises many types for a broken file; the page shows a placeholder
        return placeholder_tile(tile), "unreadable"


def write_sheet(target: str, sources: list, tile: int, quality: int) -> list[str | None]:
    """One sprite sheet of up to SHEET_TILES cells, row-major; each source a file path (str or None for a
    missing file) or a uint8 (H, W, 3) array. Returns each cell's problem (None: fine)."""
    from PIL import Image

    rows = math.ceil(len(sources) / SHEET_COLUMNS)
    sheet = Image.new("RGB", (SHEET_COLUMNS * tile, rows * tile), (255, 255, 255))
    problems: list[str | None] = []
    for cell, source in enumerate(sources):
        if isinstance(source, np.ndarray):
            image, problem = square_thumbnail(Image.fromarray(source), tile), None
        else:
            image, problem = file_tile(source, tile)
        sheet.paste(image, ((cell % SHEET_COLUMNS) * tile, (cell // SHEET_COLUMNS) * tile))
        problems.append(problem)
    sheet.save(target, "JPEG", quality=quality)
    return problems


def write_sheets(sources: list, out: Path, tile: int, quality: int, workers: int) -> list[str | None]:
    """All sheets into ``out``; with ``workers`` > 1 a process each (files only: pixels stay in this process)."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out / f"sheet-{s:05d}.jpg"), sources[i:i + SHEET_TILES])
            for s, i in enumerate(range(0, len(sources), SHEET_TILES))]
    problems: list[str | None] = []
    if workers > 1 and len(jobs) > 4 and not any(isinstance(s, np.ndarray) for s in sources[:1]):
        with ProcessPoolExecutor(workers) as pool:
            for found in pool.map(write_sheet, *zip(*jobs, strict=True), [tile] * len(jobs),
                                  [quality] * len(jobs), chunksize=4):
                problems += found
    else:
        for target, chunk in jobs:
            problems += write_sheet(target, chunk, tile, quality)
    return problems


def image_sources(table: ClusterTable, order: np.ndarray, data: str, bad_images: str,
                  images=None) -> tuple[list, list[str]]:
    """What each displayed row's tile is made from (a file path, None for a missing file, or pixels) and the
    CSV keys that name no image under ``data``. Every key missing is an error: the wrong --data. An index CSV's
    pixels come from ``images`` (uint8 (N, 3, S, S), the rows the CSV numbers) when given, else from ``data``."""
    if table.key == "path":
        root = Path(data)
        if not root.is_dir():
            raise DataError(f"--data {data} is not a folder; {table.file}'s rows name files by path, relative to the "
                            "folder given to deepclust cluster --data: give that folder")
        sources: list = []
        missing: list[str] = []
        for i in order:
            file = root / table.keys[i]
            if file.is_file():
                sources.append(str(file))
            else:
                sources.append(None)
                missing.append(table.keys[i])
        if len(missing) == len(table):
            raise DataError(f"none of the {len(table)} paths of {table.file} exists under {root} (e.g. "
                            f"{root / table.keys[0]}); --data must be the folder the paths are relative to, the "
                            "--data given to deepclust cluster")
        return sources, missing
    if images is None:
        images = load_data(data, "train", None, bad_images).images
    indices = np.array([int(k) for k in table.keys])
    if indices.max() >= len(images):
        raise DataError(f"{table.file} has index {int(indices.max())} but {data} holds {len(images)} images; --data "
                        "must be the source the CSV was written from")
    chunk = 4096  # DiskImages (a prepared cache) are read a chunk at a time, never whole
    pixels = []
    ordered = indices[order]
    for start in range(0, len(ordered), chunk):
        batch = images[ordered[start:start + chunk]]
        pixels += list(batch.permute(0, 2, 3, 1).contiguous().numpy())
    return pixels, []


def cluster_map(cluster_ids: list[int], cluster: np.ndarray, features: np.ndarray) -> dict:
    """Each cluster's centre (mean L2-normalised feature) projected to 2-D by PCA, in [0, 1], and its nearest
    clusters by centre distance: the page's map and its neighbour links."""
    feats = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    slot = {c: i for i, c in enumerate(cluster_ids)}
    rows = np.array([slot.get(int(c), -1) for c in cluster])
    keep = rows >= 0  # -1: in no cluster
    centres = np.zeros((len(cluster_ids), feats.shape[1]))
    np.add.at(centres, rows[keep], feats[keep])
    centres /= np.maximum(np.bincount(rows[keep], minlength=len(cluster_ids)), 1)[:, None]
    centred = centres - centres.mean(0)
    if len(centres) >= 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        if xy.shape[1] < 2:
            xy = np.c_[xy, np.zeros(len(xy))]
    else:
        xy = np.zeros((len(centres), 2))
    span = np.maximum(xy.max(0) - xy.min(0), 1e-12)
    xy = (xy - xy.min(0)) / span
    squares = (centres ** 2).sum(1)  # |a - b|^2 from the Gram matrix: k x k, not k x k x D (2 GiB at k = 1,000)
    distances = squares[:, None] + squares[None, :] - 2 * centres @ centres.T
    np.fill_diagonal(distances, np.inf)
    near = np.argsort(distances, axis=1)[:, :min(MAP_NEIGHBOURS, len(centres) - 1)]  # itself (inf) last
    return {"ids": cluster_ids, "x": [round(float(v), 4) for v in xy[:, 0]],
            "y": [round(float(v), 4) for v in xy[:, 1]],
            "near": [[cluster_ids[j] for j in row if j < len(cluster_ids)] for row in near.tolist()]}


def number_or_none(value: float, digits: int = 4) -> float | None:
    return None if value != value else round(float(value), digits)


def page_data(table: ClusterTable, order: np.ndarray, problems: list[str | None], tile: int,
              features: np.ndarray | None) -> dict:
    """What clusters.js holds: each displayed row's cells and parsed values, in display order."""
    labels = None
    classes: list[str] = []
    if table.label is not None:
        classes = sorted({v for v in table.label if v != ""})
        position = {name: i for i, name in enumerate(classes)}
        labels = [position.get(table.label[i], -1) for i in order]
    data = {
        "version": 1,
        "csv": table.file.name,
        "digest": table.digest,
        "key": table.key,
        "header": table.header,
        "tile": tile,
        "sheetColumns": SHEET_COLUMNS,
        "sheetTiles": SHEET_TILES,
        "count": len(table),
        "row": order.tolist(),
        "keys": [table.keys[i] for i in order],
        "cluster": table.cluster[order].tolist(),
        "cells": [table.cells[i] for i in order],
        "distance": None if table.distance is None else [number_or_none(v) for v in table.distance[order]],
        "confidence": None if table.confidence is None else [number_or_none(v) for v in table.confidence[order]],
        "classes": classes,
        "label": labels,
        "problem": {str(p): kind for p, kind in enumerate(problems) if kind is not None},
        "names": {},
        "map": None,
    }
    if table.names is not None:  # an edited CSV read back: its names are the page's starting names
        for i in range(len(table)):
            if table.names[i] and table.cluster[i] >= 0:
                data["names"][str(int(table.cluster[i]))] = table.names[i]
    if features is not None:
        if len(features) != len(table):
            raise DataError(f"the features hold {len(features)} rows but {table.file} has {len(table)}; give the "
                            "features of the same images, in the CSV's order")
        ids = sorted({int(c) for c in table.cluster if c >= 0})
        if ids:
            data["map"] = cluster_map(ids, table.cluster, np.asarray(features, dtype=np.float32))
    return data


def write_browse_page(csv_file: Path, data: str, out: Path, tile: int = 64, quality: int = 85,
                      workers: int | None = None, bad_images: str = "fail",
                      features: np.ndarray | None = None, images=None) -> dict:
    """Write the page for ``csv_file`` (images under ``data``) into ``out``; returns counts and timings.
    ``features`` (one row per CSV row, in its order) adds the map of cluster centres; ``images`` are the pixels
    of an index CSV's rows when the caller holds them (``image_sources``)."""
    start = time.perf_counter()
    table = read_clusters_csv(csv_file)
    order = display_order(table)
    sources, missing = image_sources(table, order, data, bad_images, images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = out / "tiles"
    if tiles.exists():
        shutil.rmtree(tiles)  # sheets of an earlier, larger CSV must not linger
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    problems = write_sheets(sources, tiles, tile, quality, workers)
    payload = page_data(table, order, problems, tile, features)
    script = "window.DEEPCLUST_BROWSE = " + json.dumps(payload, separators=(",", ":")) + ";\n"
    (out / "clusters.js").write_text(script, encoding="utf-8")
    for name in PAGE_FILES:
        shutil.copyfile(PAGE_DIR / name, out / name)
    unreadable = sum(1 for p in problems if p == "unreadable")
    if missing:
        log.warning("%d of the %d paths of %s do not exist under %s (e.g. %s): shown as placeholder tiles; is --data "
                    "the folder the CSV was written from?", len(missing), len(table), csv_file, data, missing[0])
    if unreadable:
        bad = [table.keys[order[p]] for p, kind in enumerate(problems) if kind == "unreadable"]
        log.warning("%d image(s) could not be read (e.g. %s): shown as placeholder tiles", unreadable, bad[0])
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"images": len(table), "clusters": len({int(c) for c in table.cluster}), "missing": len(missing),
            "unreadable": unreadable, "sheets": math.ceil(len(table) / SHEET_TILES), "seconds": seconds,
            "bytes": size, "index": out / "index.html"}


def folder_name(name: str) -> str:
    """A cluster's name as one safe folder name (no separators, no leading dot)."""
    cleaned = "".join(c if c.isalnum() or c in " -_.,()+" else "_" for c in name.strip()).strip(" .")
    return cleaned or "_"


def check_folders_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder; give a new folder for --folders (its cluster "
                        "folders would mix with what is there)")


def write_cluster_folders(table: ClusterTable, data: str, out: Path) -> dict[str, int]:
    """One folder per cluster under ``out`` of symbolic links to the images (copies where a link cannot be
    made), named by the ``name`` column when the CSV has one (the page's edited CSV), else cluster_NNNN.
    Rows of cluster -1 (in no cluster, or excluded in the page) are left out."""
    if table.key != "path":
        raise DataError(f"{table.file} names images by index, not by file: there are no files to link; folders need "
                        "a CSV of paths (cluster a folder of images)")
    root = Path(data).resolve()
    out = Path(out)
    check_folders_target(out)
    width = max(4, len(str(int(table.cluster.max()))))
    counts: dict[str, int] = {}
    copied = 0
    for i, key in enumerate(table.keys):
        c = int(table.cluster[i])
        if c < 0:
            continue
        given = table.names[i] if table.names is not None else ""
        folder = out / (folder_name(given) if given else f"cluster_{c:0{width}d}")
        folder.mkdir(parents=True, exist_ok=True)
        source = root / key
        if not source.is_file():
            raise DataError(f"{source} does not exist; --data must be the folder {table.file}'s paths are relative to")
        target = folder / key.replace("/", "__")  # class/001.jpg and other/001.jpg stay apart
        try:
            target.symlink_to(source)
        except OSError:  # a filesystem without links (FAT, some network shares): a copy
            shutil.copy2(source, target)
            copied += 1
        counts[folder.name] = counts.get(folder.name, 0) + 1
    if copied:
        log.info("copied %d image(s) where a symbolic link could not be made", copied)
    return counts


def read_features(path: str, rows: int) -> np.ndarray:
    """``features`` of an .npz from deepclust embed, one row per CSV row."""
    try:
        with np.load(path) as f:
            features = f["features"]
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"cannot read features from {path} ({err}); give the .npz that deepclust embed wrote") from None
    if features.ndim != 2 or len(features) != rows:
        raise DataError(f"{path}: features of shape {features.shape}, but the CSV has {rows} rows; give the features "
                        "of the same images in the same order (deepclust embed on the same --data)")
    return features


def report_written(info: dict) -> str:
    rate = info["images"] / max(info["seconds"], 1e-9)
    problems = "".join(f", {info[k]} {k}" for k in ("missing", "unreadable") if info[k])
    return (f"wrote {info['index']}: {info['images']} images in {info['clusters']} clusters, {info['sheets']} "
            f"thumbnail sheets, {info['bytes'] / 2**20:.1f} MiB in {info['seconds']:.1f} s ({rate:.0f} "
            f"thumbnails/s){problems}; open it in a browser (no server needed)")


def run(args: argparse.Namespace) -> int:
    if not 8 <= args.thumb_size <= 512 or not 1 <= args.quality <= 100:
        raise ConfigError(f"--thumb-size must be 8..512 px and --quality 1..100, got {args.thumb_size} and "
                          f"{args.quality}")
    table = None
    features = None
    if args.features:
        table = read_clusters_csv(Path(args.csv))
        features = read_features(args.features, len(table))
    if args.out:
        info = write_browse_page(Path(args.csv), args.data, Path(args.out), args.thumb_size, args.quality,
                                 args.workers, args.bad_images, features)
        print(report_written(info))
    if args.folders:
        table = table or read_clusters_csv(Path(args.csv))
        counts = write_cluster_folders(table, args.data, Path(args.folders))
        print(f"wrote {len(counts)} cluster folders of links into {args.folders}")
    if not args.out and not args.folders:
        raise DataError("give --out DIR (the page) or --folders DIR (a folder of links per cluster), or both")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("browse", help="write a static page to look at, name, merge and fix clusters (no server)",
                       description="Reads a clusters CSV (columns path or index, and cluster; distance, confidence "
                       "and label are used when present) and writes DIR/index.html with thumbnails beside it. "
                       "Open it from disk; edits stay in the browser and export as labels.csv and an edited CSV.")
    p.add_argument("csv", metavar="CLUSTERS.csv", help="the CSV of deepclust cluster --out, the page's edited CSV, "
                   "or any CSV with columns path (or index) and cluster")
    p.add_argument("--data", required=True, help="the images: the folder the CSV's paths are relative to, or for an "
                   "index CSV the source it was written from (digits, FILE.npz, NAME:ROOT, a prepared cache)")
    p.add_argument("--out", help="the folder to write the page into (index.html, clusters.js, tiles/)")
    p.add_argument("--folders", help="also write one folder per cluster of links to its images into this new folder, "
                   "named by the CSV's name column (an edited CSV from the page) or cluster_NNNN")
    p.add_argument("--features", help="an .npz of deepclust embed for the same images in the CSV's order: adds a map "
                   "of the cluster centres and each cluster's nearest clusters")
    p.add_argument("--thumb-size", type=int, default=64, help="thumbnail side in pixels")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality of the thumbnail sheets")
    p.add_argument("--workers", type=int, default=None, help="processes writing thumbnail sheets (default: the cores)")
    p.add_argument("--bad-images", choices=("fail", "skip"), default="fail",
                   help="for an index CSV: what loading --data does with unreadable files")
