"""What a user takes home: cluster CSVs, exported backbones, the run report, runs compared."""

from __future__ import annotations

import base64
import csv
import io
import json
import runpy
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import normalized_mutual_info_score

import deepclust
from deepclust.checkpoint import backbone_from_checkpoint, load_checkpoint
from deepclust.cli import main
from deepclust.cluster import cluster_geometry
from deepclust.commands.pages import BOOKKEEPING, fmt
from deepclust.train import read_metrics


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def deepcluster_run(tmp_path_factory, tiny_train_args) -> Path:
    """DeepCluster, 2 epochs, ConvNet width 8, 200 digits, k = 20, report built at the end of training."""
    out = tmp_path_factory.mktemp("dc_run")
    assert main(["train", "--method", "deepcluster", *tiny_train_args, "--epochs", "2", "k=20", "--out", str(out),
                 "--report"]) == 0
    return out


def planted_images(n_per: int = 12, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three groups: noisy dark-red, green and blue-striped images."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(3):
        base = np.zeros((n_per, size, size, 3), dtype=np.float64)
        base[..., g] = 200
        if g == 2:
            base[:, ::4] = 255
        groups.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    return np.concatenate(groups), np.repeat(np.arange(3), n_per)


# --- building blocks --------------------------------------------------------------------------------


def test_cluster_geometry_by_hand():
    x = torch.tensor([[0.0, 0], [2, 0], [10, 0], [12, 0], [5, 5]])
    a = torch.tensor([0, 0, 1, 1, -1])
    g = cluster_geometry(x, a)
    assert torch.allclose(g.centres, torch.tensor([[1.0, 0], [11, 0]]))
    assert g.sizes.tolist() == [2, 2]
    assert torch.allclose(g.distance[:4], torch.ones(4))
    # own centre at 1, the other at 9 (x = 0: b = 11; x = 2: b = 9): (b - a) / b
    assert torch.allclose(g.confidence[:4], torch.tensor([10 / 11, 8 / 9, 8 / 9, 10 / 11]))
    assert torch.isnan(g.distance[4]) and torch.isnan(g.confidence[4])
    # a sample nearer another centre than its own gets a negative confidence
    g = cluster_geometry(x[:4], torch.tensor([0, 0, 1, 0]))  # x = 12 in the cluster centred at 14 / 3
    assert g.confidence[3].item() == pytest.approx((2 - 22 / 3) / (22 / 3))
    assert torch.allclose(cluster_geometry(x[:4], torch.zeros(4, dtype=torch.long)).confidence, torch.ones(4))


def test_montage_groups_pick_largest_purest_least_pure():
    from deepclust.commands.report import montage_groups

    sizes = [30, 25, 20, 18, 16, 15, 14, 13, 12, 11, 1]  # cluster 10: one image, trivially pure
    assignments = np.repeat(np.arange(11), sizes)
    labels = np.zeros_like(assignments)
    labels[assignments == 3] = 1  # cluster 3 pure (class 1)
    for c, share in ((5, 0.5), (6, 0.4)):  # clusters 5 and 6 the least pure
        members = np.flatnonzero(assignments == c)
        labels[members[: int(share * len(members))]] = 2
    labels[assignments == 10] = 3
    groups = dict(montage_groups(assignments, labels, np.zeros(len(assignments)), 3))
    assert groups["largest"] == [0, 1, 2]
    assert groups["purest"][0] == 3 and 10 not in groups["purest"]  # too small to rank
    assert groups["least pure"][:2] == [5, 6]
    assert len({c for g in groups.values() for c in g}) == 9  # no cluster twice
    distance = assignments.astype(float)  # cluster c's members at distance c: 0 most compact
    groups = dict(montage_groups(assignments, None, distance, 3))
    assert groups["most compact"] == [3, 4, 5] and groups["least compact"] == [9, 8, 7]  # 0-2: the largest


# --- cluster ----------------------------------------------------------------------------------------


def test_cluster_flat_unlabelled_folder(trained_checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    images, _ = planted_images(4, size=40)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"img_{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "clusters.csv"
    rc, stdout, _ = run_cli(capsys, "cluster", "--checkpoint", trained_checkpoint, "--data", folder, "--out", out,
                            "--k", 3)
    assert rc == 0 and "3 clusters" in stdout and "NMI" not in stdout
    rows = read_csv(out)
    assert len(rows) == 12 and set(rows[0]) == {"path", "cluster", "distance", "confidence"}
    assert sorted(r["path"] for r in rows) == sorted(p.name for p in folder.glob("*.png"))
    assert all((folder / r["path"]).is_file() for r in rows)
    assert {int(r["cluster"]) for r in rows} == {0, 1, 2}
    assert all(float(r["distance"]) >= 0 and -1 <= float(r["confidence"]) <= 1 for r in rows)
    # embed keeps the same paths beside the features, readable without pickle
    rc, _, _ = run_cli(capsys, "embed", "--checkpoint", trained_checkpoint, "--data", folder, "--out",
                       tmp_path / "e.npz")
    with np.load(tmp_path / "e.npz", allow_pickle=False) as npz:
        assert rc == 0 and npz["paths"].tolist() == [r["path"] for r in rows]
    # npid has no clusters of its own: the error says to pass --k
    rc, _, err = run_cli(capsys, "cluster", "--checkpoint", trained_checkpoint, "--data", folder, "--out", out)
    assert rc == 2 and "no clusters of its own" in err and "--k" in err


def test_cluster_recovers_planted_clusters(trained_checkpoint, tmp_path, capsys):
    images, labels = planted_images(20)
    np.savez(tmp_path / "planted.npz", images=images, labels=labels)
    out = tmp_path / "c.csv"
    rc, stdout, _ = run_cli(capsys, "cluster", "--checkpoint", trained_checkpoint, "--data", tmp_path / "planted.npz",
                            "--out", out, "--k", 3)
    assert rc == 0
    rows = read_csv(out)
    assert [int(r["index"]) for r in rows] == list(range(60))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    pred = np.array([int(r["cluster"]) for r in rows])
    assert normalized_mutual_info_score(labels, pred) > 0.9
    assert "NMI 1.0000" in stdout or float(stdout.split("NMI ")[1].split(",")[0]) > 0.9


def test_cluster_lists_the_methods_own_clusters(deepcluster_run, tmp_path, capsys):
    out = tmp_path / "own.csv"
    rc, stdout, _ = run_cli(capsys, "cluster", "--checkpoint", deepcluster_run / "checkpoint.pt", "--out", out)
    assert rc == 0 and "deepcluster clusters" in stdout and "NMI" in stdout
    payload = load_checkpoint(deepcluster_run / "checkpoint.pt")
    rows = read_csv(out)
    assert [int(r["cluster"]) for r in rows] == payload["state"]["assignments"].tolist()
    # those clusters belong to the training images: other data needs --k
    rc, _, err = run_cli(capsys, "cluster", "--checkpoint", deepcluster_run / "checkpoint.pt", "--data",
                         "digits:test", "--out", out)
    assert rc == 2 and "--k" in err


@pytest.mark.parametrize("method, buffer", [("odc", "labels"), ("uic", "next_targets"), ("pcp", "history")])
def test_cluster_lists_each_methods_clusters(method, buffer, tmp_path, tiny_train_args, capsys):
    run = tmp_path / method
    assert main(["train", "--method", method, *tiny_train_args, "k=10" if method != "pcp" else "min_clusters=10",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    rc, stdout, _ = run_cli(capsys, "cluster", "--checkpoint", run / "checkpoint.pt", "--out", tmp_path / "c.csv")
    assert rc == 0 and f"{method} clusters" in stdout
    want = load_checkpoint(run / "checkpoint.pt")["state"][buffer]
    want = want[0] if method == "pcp" else want  # PCP: the newest row of its assignment history
    assert [int(r["cluster"]) for r in read_csv(tmp_path / "c.csv")] == want.tolist()


# --- export -----------------------------------------------------------------------------------------


def test_export_resnet50_loads_strict_into_torchvision(tmp_path, capsys):
    run = tmp_path / "r50"
    rc = main(["train", "--method", "supervised", "--backbone", "resnet50", "--epochs", "1", "--out", str(run),
               "image_size=64", "subset=8", "test_subset=4", "batch_size=4", "progress=false", "eval_every=0"])
    assert rc == 0
    capsys.readouterr()
    rc, stdout, _ = run_cli(capsys, "export", "--checkpoint", run / "checkpoint.pt", "--out",
                            tmp_path / "r50.safetensors")
    assert rc == 0 and "strict=True" in stdout
    state = load_file(tmp_path / "r50.safetensors")
    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    model.load_state_dict(state, strict=True)  # every tensor is a torchvision one, and none is missing
    backbone = backbone_from_checkpoint(load_checkpoint(run / "checkpoint.pt")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = backbone.features(x)
        scale = want.abs().max()  # float rounding differs between memory layouts: compare at the features' scale
        assert (model.eval()(x) - want).abs().max() <= 1e-5 * scale
        assert (deepclust.load_backbone(str(tmp_path / "r50.safetensors"))(x) - want).abs().max() <= 1e-5 * scale
    # the torchvision format: the same tensors, a plain state_dict that loads without unpickling
    rc, _, _ = run_cli(capsys, "export", "--checkpoint", run / "checkpoint.pt", "--out", tmp_path / "r50.pth",
                       "--format", "torchvision")
    tv_state = torch.load(tmp_path / "r50.pth", weights_only=True)
    assert rc == 0 and tv_state.keys() == state.keys()
    assert all(torch.equal(tv_state[k], state[k]) for k in state)


@pytest.mark.parametrize("backbone, step", [("resnet18_cifar", "model.maxpool = nn.Identity()"),
                                            ("vgg16_bn", "model.avgpool = nn.AdaptiveAvgPool2d(1)")])
def test_export_instructions_load_into_torchvision(backbone, step, tmp_path, capsys):
    run = tmp_path / backbone
    assert main(["train", "--method", "random", "--backbone", backbone, "--out", str(run), "subset=8",
                 "test_subset=4", "progress=false"]) == 0
    capsys.readouterr()
    out = tmp_path / f"{backbone}.safetensors"
    rc, stdout, _ = run_cli(capsys, "export", "--checkpoint", run / "checkpoint.pt", "--out", out)
    assert rc == 0 and step in stdout and "strict=True" in stdout
    code = stdout.split("Load it with:")[1]
    scope: dict = {}
    exec(code, scope)  # the printed lines, as a user pastes them
    backbone = backbone_from_checkpoint(load_checkpoint(run / "checkpoint.pt")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scope["model"].eval()(x), backbone.features(x), atol=1e-4)


def test_export_convnet_only_as_safetensors(trained_checkpoint, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "export", "--checkpoint", trained_checkpoint, "--out", tmp_path / "c.pth",
                         "--format", "torchvision")
    assert rc == 2 and "no torchvision counterpart" in err and "safetensors" in err
    rc, _, _ = run_cli(capsys, "export", "--checkpoint", trained_checkpoint, "--out", tmp_path / "c.safetensors")
    assert rc == 0
    module = deepclust.load_backbone(str(tmp_path / "c.safetensors"))
    backbone = backbone_from_checkpoint(load_checkpoint(trained_checkpoint)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(module(x), backbone.features(x), atol=1e-5)
    assert not any(k.startswith(("head", "memory")) for k in load_file(tmp_path / "c.safetensors"))


def test_export_format_follows_the_suffix_and_a_mismatch_is_refused(tmp_path, capsys):
    run = tmp_path / "r18"
    assert main(["train", "--method", "random", "--backbone", "resnet18_cifar", "--out", str(run), "subset=8",
                 "test_subset=4", "progress=false"]) == 0
    capsys.readouterr()
    ckpt = run / "checkpoint.pt"
    # no --format: .pth and .pt are torchvision's plain state_dict, .safetensors (and any other name) safetensors
    for name, kind in [("b.pth", "torchvision"), ("b.PT", "torchvision"), ("b.safetensors", "safetensors"),
                      ("b.bin", "safetensors")]:
        rc, stdout, _ = run_cli(capsys, "export", "--checkpoint", ckpt, "--out", tmp_path / name)
        assert rc == 0 and f"({kind})" in stdout, name
    pickled, safe = torch.load(tmp_path / "b.pth", weights_only=True), load_file(tmp_path / "b.safetensors")
    assert pickled.keys() == safe.keys() and all(torch.equal(pickled[k], safe[k]) for k in safe)
    assert load_file(tmp_path / "b.bin").keys() == safe.keys()
    # a pickle under a safetensors name, or safetensors under a torch name: refused, nothing written
    for name, kind in [("x.safetensors", "torchvision"), ("x.pth", "safetensors"), ("x.pt", "timm")]:
        rc, _, err = run_cli(capsys, "export", "--checkpoint", ckpt, "--out", tmp_path / name, "--format", kind)
        assert rc == 2 and f"--format {kind} writes a" in err and "name it" in err, err
        assert not (tmp_path / name).exists()
    rc, _, _ = run_cli(capsys, "export", "--checkpoint", ckpt, "--out", tmp_path / "t.safetensors", "--format", "timm")
    assert rc == 0 and load_file(tmp_path / "t.safetensors").keys() == safe.keys()  # timm's files are safetensors


# --- report and compare -------------------------------------------------------------------------------


class PageParser(HTMLParser):
    """Images, figures' metric keys, headings and the metrics table of a report."""

    def __init__(self):
        super().__init__()
        self.images, self.figure_keys, self.headings = [], [], []
        self.metric_figures = 0
        self.table_rows: list[list[str]] = []
        self.in_metrics = self.in_heading = False
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if "data-metrics" in attrs:  # a figure of these keys, or the line of keys that never changed
            self.figure_keys += attrs["data-metrics"].split()
            self.metric_figures += tag == "figure"
        if tag == "table" and attrs.get("class") == "metrics":
            self.in_metrics = True
        if self.in_metrics and tag == "tr":
            self.table_rows.append([])
        if self.in_metrics and tag in ("td", "th"):
            self.cell = []
        self.in_heading = tag in ("h2", "h3")

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_metrics = False
        if self.in_metrics and tag in ("td", "th") and self.cell is not None:
            self.table_rows[-1].append("".join(self.cell))
            self.cell = None
        if tag in ("h2", "h3"):
            self.in_heading = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.in_heading:
            self.headings.append(data)


def decode(src: str, base: Path) -> Image.Image:
    if src.startswith("data:image/png;base64,"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    return Image.open(base / src).convert("RGB")


def test_report_of_a_short_run(deepcluster_run):
    page = PageParser()
    page.feed((deepcluster_run / "report.html").read_text())
    rows = read_metrics(deepcluster_run / "metrics.jsonl")
    numeric = {k for r in rows for k, v in r.items()
               if k not in BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"loss", "lr", "knn_top1", "nmi_labels", "nmi_prev", "cluster_size_max"} <= numeric
    assert set(page.figure_keys) == numeric  # a plot for every number the run logged (or its one value)
    for src in page.images:
        image = decode(src, deepcluster_run)
        assert image.size[0] > 10 and image.size[1] > 10
    for heading in ("Training curves", "Test embeddings", "Clusters and classes", "Cluster montages",
                    "largest", "purest", "least pure", "The method's own clusters", "Metrics log"):
        assert heading in page.headings
    columns = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    assert page.table_rows[0] == columns
    assert page.table_rows[1:] == [[fmt(r.get(c)) for c in columns] for r in rows]
    # the images: the curves, the two projections (by class, by cluster), 3 x 3 montage rows of the test clusters
    assert len(page.images) == page.metric_figures + 2 + 9 + 9  # and 3 x 3 of the method's own clusters


def test_report_command_on_unlabelled_test_data(deepcluster_run, tmp_path, capsys):
    images, _ = planted_images(10)
    np.savez(tmp_path / "u.npz", images=images)
    rc, stdout, _ = run_cli(capsys, "report", deepcluster_run, "--test-data", tmp_path / "u.npz", "--k", "3")
    assert rc == 0 and "report.html" in stdout
    page = PageParser()
    page.feed((deepcluster_run / "report.html").read_text())
    assert "all 3 clusters, largest first" in page.headings and "Clusters and classes" not in page.headings
    for src in page.images:
        decode(src, deepcluster_run)


def test_compare_lists_both_runs(trained_run, deepcluster_run, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    rc, stdout, _ = run_cli(capsys, "compare", trained_run, deepcluster_run, "--html", out)
    assert rc == 0
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in body] == [trained_run.name, deepcluster_run.name]
    assert [row[header.index("method")] for row in body] == ["npid", "deepcluster"]
    finals = [next(r["knn_top1"] for r in reversed(read_metrics(d / "metrics.jsonl")) if r.get("knn_top1") is not None)
              for d in (trained_run, deepcluster_run)]
    assert [float(row[header.index("knn_top1")]) for row in body] == pytest.approx(finals, rel=1e-5)
    page = PageParser()
    page.feed(out.read_text())
    assert "knn_top1" in page.figure_keys and all(decode(s, tmp_path) for s in page.images)
    rc, _, err = run_cli(capsys, "compare", trained_run, tmp_path / "nowhere")
    assert rc == 2 and "metrics.jsonl" in err


def test_python_m_deepclust(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["deepclust", "methods"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("deepclust", run_name="__main__")  # what `python -m deepclust methods` runs
    assert done.value.code == 0 and "deepcluster" in capsys.readouterr().out


def test_metrics_table_is_json(deepcluster_run):
    # metrics.jsonl stays plain JSON lines that the report and compare read
    assert all(json.loads(line) for line in (deepcluster_run / "metrics.jsonl").read_text().splitlines())


def test_tensorboard_logger_writes_the_metrics_scalars(tmp_path, tiny_train_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb_run"
    assert main(["train", "--method", "npid", *tiny_train_args, "--out", str(out), "logger=tensorboard"]) == 0
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    rows = read_metrics(out / "metrics.jsonl")
    want = {(k, r["global_epoch"] + 1): v for r in rows for k, v in r.items()
            if k not in ("round", "epoch", "global_epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    got = {(tag, e.step): e.value for tag in board.Tags()["scalars"] for e in board.Scalars(tag)}
    assert got.keys() == want.keys() and ("knn_top1", 0) in got  # step 0: the untrained network
    assert all(got[key] == pytest.approx(want[key], rel=1e-6) for key in want)


def test_unknown_logger_is_an_error(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "o", "logger=wandb")
    assert rc == 2 and "unknown logger 'wandb'" in err and "tensorboard" in err
