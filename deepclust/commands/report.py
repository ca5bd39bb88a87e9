"""``deepclust report RUN_DIR``: one self-contained HTML page (PNGs embedded) of what a run learned.

Training curves of whatever metrics.jsonl holds; a t-SNE (UMAP when umap-learn is installed) of the test
embeddings coloured by class and by cluster; the cluster-to-class table after Hungarian matching; montages
of the largest, purest and least pure clusters; the metrics log as a table.
"""

from __future__ import annotations

import argparse
import html
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbone_files import DEVICE_HELP
from ..checkpoint import CheckpointError, backbone_from_checkpoint, load_checkpoint
from ..cluster import cluster_geometry, kmeans
from ..data import DataError, ImageData, default_test_spec, load_data, square_uint8
from ..eval import assignment_metrics, contingency, extract_features, hungarian_match
from .cluster import load_cluster_data, method_clusters
from .pages import (
    BOOKKEEPING,
    array_uri,
    figure_html,
    figure_uri,
    fmt,
    integer_epochs,
    is_number,
    page,
    pyplot,
    read_run,
    table,
)

log = logging.getLogger(__name__)

SIZE_STAT = re.compile(r"^(.+)_(min|median|mean|max)$")  # cluster_size_min, class_size_max, ... share a plot


def metric_groups(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The numeric keys of the log, grouped into plots: size statistics of one prefix together, times together,
    every other key alone; in order of first appearance."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in BOOKKEEPING and k not in keys and is_number(v)]
    groups: dict[str, list[str]] = {}
    for key in keys:
        size = SIZE_STAT.match(key)
        name = size.group(1) if size else "time" if key == "time" or key.endswith("_time") else key
        groups.setdefault(name, []).append(key)
    return list(groups.values())


DESCRIPTIONS = {  # what a known key means; others are plotted without a caption
    "knn_top1": "weighted kNN top-1 (%) on the test images; dashed: the untrained network",
    "loss": "training loss, mean over the epoch's batches",
    "lr": "learning rate",
    "nmi_labels": "NMI of the training pseudo-labels with the true classes",
    "nmi_prev": "NMI of this epoch's clusters with the previous epoch's (stability)",
    "label_change": "share of images whose pseudo-label changed in the epoch",
    "batch_label_change": "share of a batch's labels changed by each step, mean over the epoch",
    "n_clusters": "number of clusters",
}


def group_title(keys: list[str]) -> str:
    size = SIZE_STAT.match(keys[0])
    if size and len(keys) > 1:
        return f"{size.group(1)} ({' / '.join(SIZE_STAT.match(k).group(2) for k in keys)})"
    if keys[0] == "time" or keys[0].endswith("_time"):
        return "seconds per epoch"
    return ", ".join(keys)


def curve_figures(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """One figure per group of keys that changed during the run; and the keys that never changed, with value."""
    plt = pyplot()
    trained = [r for r in rows if not r.get("untrained")]
    baseline = next((r.get("knn_top1") for r in rows if r.get("untrained")), None)
    rounds = sorted({r.get("round", 0) for r in trained})
    out, constant = [], {}
    for keys in metric_groups(rows):
        series = {k: [(r["global_epoch"] + 1, r[k]) for r in trained if is_number(r.get(k))] for k in keys}
        values = {v for points in series.values() for _, v in points}
        if len(values) == 1 and sum(len(p) for p in series.values()) > 1:
            constant.update({k: values.pop() for k in keys})
            continue  # a flat line says less than its value
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        for key, points in series.items():
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, marker="o" if len(points) < 30 else None, ms=3, label=key)
        if "knn_top1" in keys and is_number(baseline):
            ax.axhline(baseline, ls="--", color="grey", lw=1, label="untrained network")
        if len(rounds) > 1:
            starts = [min(r["global_epoch"] for r in trained if r.get("round") == k) for k in rounds[1:]]
            for start in starts:
                ax.axvline(start + 0.5, color="#bbb", lw=0.8)
        ax.set_xlabel("epoch" + (" (all rounds; grey lines: round starts)" if len(rounds) > 1 else ""))
        ax.set_title(group_title(keys), fontsize=10)
        integer_epochs(ax, [x for points in series.values() for x, _ in points])
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        caption = DESCRIPTIONS.get(keys[0], "") if len(keys) == 1 else ""
        out.append(figure_html(figure_uri(fig), caption, keys, group_title(keys)))
    return out, constant


def project_2d(feats: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """UMAP when umap-learn is installed, else scikit-learn's t-SNE."""
    try:
        import umap

        return umap.UMAP(random_state=seed).fit_transform(feats), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(feats) - 1) // 3)))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats), "t-SNE"


def scatter(points: np.ndarray, colour: np.ndarray, title: str, names: list[str] | None) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    fig.subplots_adjust(left=0.02, right=0.7, top=0.93, bottom=0.02)  # the same size with any legend
    count = int(colour.max()) + 1
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20" if count <= 20 else "turbo", max(count, 2))
    ax.scatter(points[:, 0], points[:, 1], c=colour, cmap=cmap, vmin=-0.5, vmax=max(count, 2) - 0.5, s=6,
               linewidths=0)
    if count <= 20:
        handles = [plt.Line2D([], [], ls="", marker="o", color=cmap(i), ms=5) for i in range(count)]
        ax.legend(handles, names or [str(i) for i in range(count)], fontsize=7, markerscale=1,
                  loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return figure_html(figure_uri(fig, tight=False), "", alt=title)


def montage_row(images: torch.Tensor, tile: int = 64) -> str:
    """One strip of uint8 (n, 3, S, S) images, 2 px apart: small ones enlarged to ``tile`` px (nearest), large
    ones reduced to 2 ``tile`` px."""
    from torchvision.utils import make_grid

    if images.shape[-1] > 2 * tile:  # large images: thumbnails keep the page small
        images = square_uint8(images, 2 * tile)
    scale = max(1, tile // images.shape[-1])
    big = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    grid = make_grid(big, nrow=len(big), padding=2, pad_value=255)
    return array_uri(grid.permute(1, 2, 0).numpy())


def montage_groups(assignments: np.ndarray, labels: np.ndarray | None, distance: np.ndarray,
                   per_group: int) -> list[tuple[str, list[int]]]:
    """The largest, purest and least pure clusters (most and least compact without labels). Purity ranks only
    clusters of at least half the median size (a cluster of one image is trivially pure), and a cluster shown
    in one group is not shown again while others remain."""
    ids, counts = np.unique(assignments[assignments >= 0], return_counts=True)  # -1: in no cluster
    size = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    if len(size) <= 3 * per_group:  # few clusters: each once
        return [(f"all {len(size)} clusters, largest first", sorted(size, key=lambda c: -size[c]))]
    big_enough = [c for c in size if size[c] >= max(2, np.median(counts) / 2)] or list(size)
    if labels is not None:
        assigned = assignments >= 0
        table_ = contingency(assignments[assigned], labels[assigned])
        score = {c: table_[c].max() / size[c] for c in size}
        names = ("purest", "least pure")
    else:
        score = {c: -float(np.nanmean(distance[assignments == c])) for c in size}
        names = ("most compact", "least compact")
    ranked = [("largest", sorted(size, key=lambda c: -size[c])),
              (names[0], sorted(big_enough, key=lambda c: (-score[c], -size[c]))),
              (names[1], sorted(big_enough, key=lambda c: (score[c], -size[c])))]
    shown: set[int] = set()
    groups = []
    for title, order in ranked:
        fresh = [c for c in order if c not in shown]
        pick = (fresh + [c for c in order if c in shown])[:per_group]
        shown.update(pick)
        groups.append((title, pick))
    return groups


def montages(data: ImageData, assignments: np.ndarray, distance: np.ndarray, per_group: int = 3,
             per_row: int = 12) -> str:
    """A row of images for each of the largest, purest and least pure clusters; the members shown are spread
    evenly from the nearest to the farthest from the cluster's centre."""
    labels = None if data.labels is None else data.labels.numpy()
    names = data.classes or (None if labels is None else [str(i) for i in range(data.num_classes)])
    parts = []
    for title, clusters in montage_groups(assignments, labels, distance, per_group):
        parts.append(f"<h3>{html.escape(title)}</h3>")
        for c in clusters:
            members = np.flatnonzero(assignments == c)
            members = members[np.argsort(distance[members])]
            shown = members[np.unique(np.linspace(0, len(members) - 1, min(per_row, len(members))).round().astype(int))]
            caption = f"cluster {c} · {len(members)} image{'s' * (len(members) != 1)}"
            if labels is not None:
                counts = np.bincount(labels[members], minlength=len(names))
                top = np.argsort(-counts)[:3]
                caption += " · classes " + ", ".join(f"{names[t]} ({100 * counts[t] / len(members):.0f}%)"
                                                      for t in top if counts[t])
            strip = montage_row(data.images[torch.from_numpy(shown)])
            parts.append(f'<p>{html.escape(caption)}</p><img src="{strip}" alt="{html.escape(caption)}">')
    return '<div class="montage">' + "".join(parts) + "</div>"


def matching_table(assignments: np.ndarray, labels: np.ndarray, names: list[str]) -> str:
    """Clusters (rows, in the order of their matched class) against classes; matched cells in bold."""
    counts = contingency(assignments, labels)
    rows, cols = hungarian_match(counts)
    match = dict(zip(rows.tolist(), cols.tolist(), strict=True))
    order = sorted(range(counts.shape[0]), key=lambda c: (match.get(c, counts.shape[1]), -counts[c].sum()))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = []
    for c in order:
        total = counts[c].sum()
        if total == 0:
            continue
        cells = []
        for j, n in enumerate(counts[c]):
            shade = f"background: rgba(31,119,180,{0.85 * n / total:.2f});" if n else ""
            bold = "font-weight: bold; outline: 2px solid #d62728;" if match.get(c) == j else ""
            cells.append(f'<td style="{shade}{bold}">{n}</td>')
        matched = names[match[c]] if c in match else "—"
        body.append(f'<tr><td class="l">{c}</td><td class="l">{html.escape(matched)}</td><td>{total}</td>'
                    f"<td>{100 * counts[c].max() / total:.0f}%</td>{''.join(cells)}</tr>")
    return ('<div class="scroll"><table><thead><tr><th class="l">cluster</th><th class="l">matched class</th>'
            f"<th>size</th><th>purity</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def embedding_sections(payload: dict[str, Any], config: dict[str, Any], test_spec: str | None, k: int | None,
                       max_points: int, device: str, labels: str | None = None) -> str:
    """t-SNE / UMAP of the test images, k-means clusters against classes, montages of those clusters."""
    spec = test_spec or config.get("test_data") or default_test_spec(config.get("data", "digits"))
    if spec is None:
        return ('<h2>Test embeddings</h2><p class="note">No test data (pass --test-data): no embeddings or '
                "clusters of test images to show.</p>")
    subset = None if test_spec else config.get("test_subset")
    data = load_data(spec, "test", payload["backbone"]["image_size"], config.get("bad_images", "fail"), subset,
                     labels=labels)
    if len(data) > max_points:
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:max_points].sort()
                           .values)
    feature = payload["eval_feature"]
    model = backbone_from_checkpoint(payload).to(device)
    feats = extract_features(model, data.images, feature, device=torch.device(device)).cpu()
    k = k or data.num_classes or 10
    assignments = kmeans(feats, k, iters=50, seed=0, n_init=5).assignments
    distance = cluster_geometry(feats, assignments).distance.numpy()
    points, projection = project_2d(feats.numpy())
    a = assignments.numpy()
    names = data.classes or (None if data.labels is None else [str(i) for i in range(data.num_classes)])
    what = (f"{len(data)} images of {data.name}, {feature} features; clusters: k-means with k = {k} on the same "
            "features")
    figs = []
    colour, legend = a, [f"cluster {c}" for c in range(k)]
    if data.labels is not None:
        figs.append(scatter(points, data.labels.numpy(), f"{projection} coloured by true class", names))
        # the colour of each cluster is the colour of the class it is matched to, so the two plots compare
        rows, cols = hungarian_match(contingency(a, data.labels.numpy()))
        unmatched = [c for c in range(k) if c not in set(rows.tolist())]
        slot = {**dict(zip(rows.tolist(), cols.tolist(), strict=True)),
                **{c: data.num_classes + i for i, c in enumerate(unmatched)}}
        colour = np.array([slot[c] for c in a])
        legend = [""] * (data.num_classes + len(unmatched))
        for c, j in slot.items():
            legend[j] = f"cluster {c}" + (f" → {names[j]}" if j < data.num_classes else "")
    figs.append(scatter(points, colour, f"{projection} coloured by k-means cluster (k = {k})", legend))
    out = [f"<h2>Test embeddings</h2><p class='sub'>{html.escape(what)}"
           + (" (each cluster drawn in the colour of the class it is matched to)" if data.labels is not None else "")
           + f"</p><div class='grid wide'>{''.join(figs)}</div>"]
    if data.labels is not None:
        m = assignment_metrics(assignments, data.labels)
        out.append(f"<h2>Clusters and classes</h2><p>NMI {m['nmi']:.4f} · ARI {m['ari']:.4f} · accuracy "
                   f"{m['acc']:.2f}% after Hungarian matching of the {k} clusters to the {data.num_classes} "
                   "classes (matched cells outlined; shading: share of the cluster).</p>"
                   + matching_table(a, data.labels.numpy(), names))
    out.append("<h2>Cluster montages</h2><p class='sub'>The k-means clusters of the test images above; each row "
               "shows up to 12 members, from the nearest to the farthest from the cluster's centre.</p>"
               + montages(data, a, distance))
    return "".join(out)


def curves_section(rows: list[dict[str, Any]]) -> str:
    figures, constant = curve_figures(rows)
    flat = ""
    if constant:
        items = ", ".join(f"{html.escape(k)} = {html.escape(fmt(v))}" for k, v in constant.items())
        flat = f"<p class='note' data-metrics='{html.escape(' '.join(constant))}'>The same every epoch: {items}.</p>"
    return "<h2>Training curves</h2><div class='grid'>" + "".join(figures) + "</div>" + flat


def own_clusters_section(payload: dict[str, Any], device: str) -> str:
    """Montages of the method's own clusters of its training images (DeepCluster, ODC, UIC, ...), if it has any."""
    own = method_clusters(payload)
    if own is None:
        return ""
    try:
        data, _ = load_cluster_data(payload, None, "fail")
    except (DataError, CheckpointError) as err:
        return f"<h2>The method's own clusters</h2><p class='note'>Not shown: {html.escape(str(err))}</p>"
    model = backbone_from_checkpoint(payload).to(device)
    feats = extract_features(model, data.images, payload["eval_feature"], device=torch.device(device)).cpu()
    distance = cluster_geometry(feats, own).distance.numpy()
    count = int((own.unique() >= 0).sum())
    return (f"<h2>The method's own clusters</h2><p class='sub'>The {count} clusters of {payload['method']} on its "
            f"{len(data)} training images ({html.escape(data.name)}) at the end of training, as "
            "<code>deepclust cluster</code> lists them; each row shows up to 12 members, from the nearest to the "
            "farthest from the cluster's centre.</p>" + montages(data, own.numpy(), distance))


def summary(config: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    trained = [r for r in rows if not r.get("untrained")]
    knn = next((r["knn_top1"] for r in reversed(trained) if is_number(r.get("knn_top1"))), None)
    base = next((r["knn_top1"] for r in rows if r.get("untrained") and is_number(r.get("knn_top1"))), None)
    epochs = max((r.get("global_epoch", -1) for r in trained), default=-1) + 1
    parts = [f"backbone {config.get('backbone', '?')}", f"{epochs} epoch{'s' * (epochs != 1)} logged"]
    if knn is not None:
        parts.append(f"final kNN top-1 {knn:.2f}%" + (f" (untrained network: {base:.2f}%)" if base is not None else ""))
    return " · ".join(html.escape(p) for p in parts)


def learned_sections(run_dir: Path, config: dict[str, Any], test_spec: str | None, k: int | None,
                     max_points: int, device: str, labels: str | None = None) -> str:
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        return '<p class="note">No checkpoint.pt in the run folder: no embeddings or clusters to show.</p>'
    payload = load_checkpoint(checkpoint)
    return (embedding_sections(payload, config, test_spec, k, max_points, device, labels)
            + own_clusters_section(payload, device))


def browse_pages(run_dir: Path) -> list[Path]:
    """Cluster browser pages (deepclust browse, cluster --browse) in folders of the run: index.html with clusters.js."""
    return sorted(d / "index.html" for d in run_dir.iterdir()
                  if d.is_dir() and (d / "index.html").is_file() and (d / "clusters.js").is_file())


def browse_links(run_dir: Path) -> str:
    pages = browse_pages(run_dir)
    if not pages:
        return ""
    links = ", ".join(f'<a href="{html.escape(p.relative_to(run_dir).as_posix())}">{html.escape(p.parent.name)}/</a>'
                      for p in pages)
    return f"<p class='sub'>Look at every cluster, name and fix them: {links} (cluster browser)</p>"


def write_report(run_dir: Path, test_spec: str | None = None, k: int | None = None, max_points: int = 2000,
                 device: str = "cpu", labels: str | None = None) -> Path:
    """Write ``run_dir/report.html``; returns its path. ``labels`` (a path,label CSV) labels the test images."""
    config, rows = read_run(run_dir)
    title = f"{config.get('method', 'run')} on {config.get('data', '?')}"
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    body = [f"<h1>deepclust report: {html.escape(title)}</h1>",
            f"<p class='sub'>{summary(config, rows)} · {html.escape(str(run_dir))} · "
            f"{time.strftime('%Y-%m-%d %H:%M')}</p>",
            browse_links(run_dir),
            curves_section(rows),
            learned_sections(run_dir, config, test_spec, k, max_points, device, labels),
            "<h2>Metrics log</h2><p class='sub'>metrics.jsonl, one row per epoch (epoch -1: the untrained "
            "network).</p><div class='scroll'>"
            + table(columns, [[r.get(c) for c in columns] for r in rows], "metrics") + "</div>"]
    path = run_dir / "report.html"
    path.write_text(page(f"deepclust: {title}", "".join(body)))
    return path


def run(args: argparse.Namespace) -> int:
    path = write_report(Path(args.run_dir), args.test_data, args.k, args.max_points, args.device, args.labels)
    print(f"wrote {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html: curves, embeddings, clusters, montages")
    p.add_argument("run_dir", help="a deepclust train --out folder")
    p.add_argument("--test-data", help="default: the run's test data")
    p.add_argument("--labels", help="a CSV of path,label (the cluster browser's labels.csv) labelling the test images "
                   "the report shows, instead of their own labels")
    p.add_argument("--k", type=int, help="k-means clusters of the test images (default: the class count, else 10)")
    p.add_argument("--max-points", type=int, default=2000, help="test images embedded at most (a random subset)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
