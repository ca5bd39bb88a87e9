"""``deepclust cluster``: every image's cluster, its distance to the cluster's centre and a confidence, as CSV."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbone_files import BACKBONE_FILE_HELP, add_backbone_file_flags, add_reading_flags, open_backbone
from ..checkpoint import CheckpointError, backbone_from_checkpoint
from ..cluster import ClusterGeometry, check_cluster_count, cluster_geometry, kmeans
from ..config import ConfigError
from ..data import DataError, ImageData, load_data
from ..eval import assignment_metrics, extract_features
from ..methods import METHODS, Method
from .browse import check_folders_target, read_clusters_csv, report_written, write_browse_page, write_cluster_folders

log = logging.getLogger(__name__)


def method_clusters(payload: dict[str, Any]) -> torch.Tensor | None:
    """The checkpoint's method's own cluster id per training sample, or None when it has none."""
    cls = METHODS.get(payload["method"])
    if cls is None or cls.cluster_assignments is Method.cluster_assignments:
        return None  # no clusters: no need to rebuild the method
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    hparams = cls.Config(**{k: v for k, v in payload["config"].items() if k in fields})
    method = cls(backbone_from_checkpoint(payload), payload["num_samples"], hparams)
    method.load_state_dict(payload["state"])
    found = method.cluster_assignments()
    return None if found is None else found.detach().cpu().clone()


def load_cluster_data(payload: dict[str, Any], spec: str | None, bad_images: str,
                      image_size: int | None = None) -> tuple[ImageData, bool]:
    """``spec`` (default: the run's training data, with its subset) and whether it is the training data, at
    ``image_size`` (default: the checkpoint's)."""
    cfg = payload["config"]
    training = spec is None or spec == cfg["data"]
    size = image_size or payload["backbone"]["image_size"]
    if not training:
        return load_data(spec, "train", size, bad_images), False
    data = load_data(cfg["data"], "train", size, cfg.get("bad_images", bad_images), cfg.get("subset"),
                     subset_imbalance=cfg.get("subset_imbalance"))
    if len(data) != payload["num_samples"]:
        raise CheckpointError(f"the run was trained on {payload['num_samples']} images of {cfg['data']}, which now "
                              f"holds {len(data)}; pass --k K to cluster the images as they are now")
    return data, True


def sizes_summary(sizes: torch.Tensor) -> str:
    live = sizes[sizes > 0].sort(descending=True).values
    return (f"{live.numel()} clusters, sizes {int(live.min())}..{int(live.max())} "
            f"(median {float(live.float().median()):g}; largest {', '.join(str(int(s)) for s in live[:5])})")


def write_csv(path: Path, data: ImageData, assignments: torch.Tensor, geometry: ClusterGeometry) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    has_paths = data.paths is not None
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path" if has_paths else "index", "cluster", "distance", "confidence"]
                     + ([] if data.labels is None else ["label"]))
        for i in range(len(data)):
            row = [data.paths[i] if has_paths else i, int(assignments[i])]
            d, c = float(geometry.distance[i]), float(geometry.confidence[i])
            row += ["" if d != d else f"{d:.6f}", "" if c != c else f"{c:.6f}"]  # NaN: unassigned
            if data.labels is not None:
                label = int(data.labels[i])
                row.append(data.classes[label] if data.classes else label)
            out.writerow(row)


@dataclasses.dataclass
class FeatureRows:
    """The rows of a features file, for ``write_csv`` (what it reads of an ``ImageData``)."""

    name: str
    size: int
    paths: list[str] | None
    labels: torch.Tensor | None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return self.size


def read_features(path: Path, paths_file: Path | None) -> tuple[torch.Tensor, FeatureRows]:
    """An (N, D) float32 feature matrix made by any tool and its rows: an .npy of the matrix, or an .npz with a
    ``features`` array (``deepclust embed``'s; else its only 2-D array) and maybe ``paths`` and ``labels``.
    ``paths_file``: a text file of the rows' paths, one a line. Read without unpickling (``allow_pickle=False``)."""
    if not path.is_file():
        raise DataError(f"no features file {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays (a pickled list of paths) or not a NumPy file
        raise DataError(f"cannot read {path} as .npy / .npz without unpickling ({err}); save the features as a "
                        "float array and the paths as a str array (np.array(paths, dtype=str))") from err
    arrays = dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else {"features": loaded}
    if "features" in arrays:
        feats = arrays["features"]
    else:
        matrices = [k for k, v in arrays.items() if v.ndim == 2]
        if len(matrices) != 1:
            raise DataError(f"{path} has no 'features' array (arrays: {', '.join(arrays) or 'none'}); save the "
                            "(N, D) matrix as features=... (np.savez(path, features=X, paths=P))")
        feats = arrays[matrices[0]]
    if feats.ndim != 2 or feats.shape[0] == 0 or not np.issubdtype(feats.dtype, np.number):
        raise DataError(f"{path}: the features must be a numeric (N, D) matrix with N >= 1, got {feats.dtype} of "
                        f"shape {feats.shape}")
    n = feats.shape[0]
    paths = None
    if paths_file is not None:
        if not paths_file.is_file():
            raise DataError(f"no paths file {paths_file}")
        paths = [line for line in paths_file.read_text().splitlines() if line.strip()]
        where = str(paths_file)
    elif "paths" in arrays:
        paths, where = [str(p) for p in arrays["paths"].reshape(-1)], f"{path}'s paths array"
    if paths is not None and len(paths) != n:
        raise DataError(f"{where} lists {len(paths)} paths for {n} feature rows; give one path a row, in order")
    labels = torch.from_numpy(arrays["labels"].astype(np.int64)) if "labels" in arrays else None
    if labels is not None and labels.shape != (n,):
        raise DataError(f"{path}: labels of shape {tuple(labels.shape)} for {n} feature rows")
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    bad = int((~torch.isfinite(x)).any(1).sum())
    if bad:
        raise DataError(f"{path}: {bad} of {n} feature rows hold NaN or inf (or values beyond float32); drop or "
                        "recompute those rows")
    return x, FeatureRows(path.name, n, paths, labels)


def run_features(args: argparse.Namespace) -> int:
    """``cluster --features F --k K``: k-means on features made elsewhere (L2-normalised, as a network's are
    here), the same CSV as for a checkpoint; ``--data``, the folder the rows' paths are relative to, for
    ``--browse`` and ``--folders``."""
    if args.checkpoint is not None:
        raise ConfigError("--features clusters the features in the file: leave out --checkpoint")
    if args.k is None:
        raise ConfigError("--features needs --k K: the number of clusters k-means makes")
    feats, rows = read_features(args.features, args.paths)
    if (args.browse or args.folders) and (args.data is None or rows.paths is None):
        raise ConfigError("--browse and --folders with --features need the rows' image files: --data FOLDER and "
                          "the paths relative to it (--paths FILE, or a 'paths' array in the .npz)")
    if args.folders:
        check_folders_target(Path(args.folders))
    check_cluster_count(args.k, len(rows), "cluster --k")
    feats = F.normalize(feats, dim=1)
    assignments = kmeans(feats, args.k, iters=50, seed=args.seed, n_init=args.restarts).assignments
    geometry = cluster_geometry(feats, assignments)
    write_csv(Path(args.out), rows, assignments, geometry)
    print(f"wrote {args.out}: {len(rows)} rows of {args.features} ({feats.shape[1]} dimensions), k-means, k = "
          f"{args.k}, on the L2-normalised features: {sizes_summary(geometry.sizes)}")
    if rows.labels is not None:
        m = assignment_metrics(assignments, rows.labels)
        print(f"against the labels: NMI {m['nmi']:.4f}, ARI {m['ari']:.4f}, accuracy {m['acc']:.2f}% "
              "(Hungarian matching of clusters to classes)")
    if args.browse:
        print(report_written(write_browse_page(Path(args.out), args.data, Path(args.browse), features=feats.numpy())))
    if args.folders:
        counts = write_cluster_folders(read_clusters_csv(Path(args.out)), args.data, Path(args.folders))
        print(f"wrote {len(counts)} cluster folders of links to the images into {args.folders}")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "features", None) is not None:
        return run_features(args)
    if args.checkpoint is None:
        raise ConfigError("pass --checkpoint C (cluster a network's features of --data) or --features F "
                          "(cluster features made elsewhere)")
    opened = open_backbone(args.checkpoint, args.backbone, args.image_size, args.feature)
    payload = opened.payload
    if payload is None:  # a plain backbone file: no run, so no training data and no clusters of its own
        if args.data is None or args.k is None:
            raise ConfigError(f"{args.checkpoint} is {opened.file.description}, not a training checkpoint: pass "
                              "--data DIR and --k K to cluster DIR's images with k-means on its features")
        data, training = load_data(args.data, "train", opened.image_size, args.bad_images), False
    else:
        data, training = load_cluster_data(payload, args.data, args.bad_images, args.image_size)
    if args.folders:  # refused before the features are computed, not after
        if data.paths is None:
            raise ConfigError(f"--folders links image files, and {data.name} is not a folder of images; leave out "
                              "--folders (--browse works for any data)")
        check_folders_target(Path(args.folders))
    feature = opened.eval_feature
    device = torch.device(args.device)
    model = opened.model.to(device)
    feats = extract_features(model, data.images, feature, device=device).cpu()
    if args.k is not None:
        check_cluster_count(args.k, len(data), "cluster --k")
        assignments = kmeans(feats, args.k, iters=50, seed=args.seed, n_init=args.restarts).assignments
        source = f"k-means, k = {args.k}, on the {feature} features"
    else:
        own = method_clusters(payload)
        if own is None:
            raise CheckpointError(f"method {payload['method']!r} has no clusters of its own in {args.checkpoint}; "
                                  "pass --k K to cluster the images with k-means")
        if not training:
            raise CheckpointError(f"the method's clusters belong to its training images ({payload['config']['data']}"
                                  f"); leave out --data to list those, or pass --k K to cluster {args.data}")
        assignments, source = own, f"the {payload['method']} clusters of the last epoch"
    geometry = cluster_geometry(feats, assignments)
    write_csv(Path(args.out), data, assignments, geometry)
    assigned = assignments >= 0
    unassigned = int((~assigned).sum())
    print(f"wrote {args.out}: {len(data)} images of {data.name}, {source}: {sizes_summary(geometry.sizes)}"
          + (f"; {unassigned} images in no cluster (-1)" if unassigned else ""))
    if data.labels is not None:
        m = assignment_metrics(assignments[assigned], data.labels[assigned])
        print(f"against the labels: NMI {m['nmi']:.4f}, ARI {m['ari']:.4f}, accuracy {m['acc']:.2f}% "
              "(Hungarian matching of clusters to classes)")
    if args.browse:  # the folder's own files make the thumbnails; other sources the pixels just clustered
        info = write_browse_page(Path(args.out), data.name, Path(args.browse), features=feats.numpy(),
                                 images=None if data.paths is not None else data.images)
        print(report_written(info))
    if args.folders:
        counts = write_cluster_folders(read_clusters_csv(Path(args.out)), data.name, Path(args.folders))
        print(f"wrote {len(counts)} cluster folders of links to the images into {args.folders}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="write each image's cluster, distance to its centre and confidence (CSV)",
                       description="Without --k: the method's own clusters of its training images (DeepCluster, "
                       "ODC, UIC, SwAV, DeepClusterV2, SeLa). With --k: k-means on the checkpoint's features of any "
                       "--data. Confidence is (b - a) / max(a, b), a the distance to the own centre, b "
                       "to the nearest other one.")
    p.add_argument("--checkpoint", help=BACKBONE_FILE_HELP + "; a plain file needs --data and --k")
    p.add_argument("--features", type=Path, help="instead of --checkpoint: cluster features made by any tool (CLIP "
                   "embeddings, deepclust embed's): an .npz with a 'features' (N, D) array and maybe 'paths' and "
                   "'labels', or an .npy of the matrix; needs --k")
    p.add_argument("--paths", type=Path, help="--features: a text file of the rows' paths (relative to your image "
                   "folder), one a line, for the CSV's path column (default: the .npz's 'paths', else row numbers)")
    add_backbone_file_flags(p)
    p.add_argument("--data", help="default: the run's training data (--features: the image folder the paths are "
                   "relative to, for --browse and --folders)")
    p.add_argument("--out", required=True, help="the CSV file to write")
    p.add_argument("--k", type=int, help="k-means with this many clusters instead of the method's clusters")
    p.add_argument("--restarts", type=int, default=5, help="k-means restarts (the lowest inertia wins)")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means initialisations (with --k)")
    add_reading_flags(p)
    p.add_argument("--browse", metavar="DIR", help="also write the cluster browser page into DIR (as deepclust browse "
                   "does, with a map of the cluster centres)")
    p.add_argument("--folders", metavar="DIR", help="also write one folder per cluster (cluster_NNNN) of links to the "
                   "images into the new folder DIR (a folder --data only; copies where links are impossible)")
