"""``deepclust transfer`` (issue 33) end to end on a generated VOC layout, on one CPU thread: Faster R-CNN with an
FPN on an exported ResNet-18 and on the ConvNet's single map, FCN and DeepLabV3, the multi-label head; the loss
falls, the metrics are in range, a resumed run equals the uninterrupted one, bad input is refused with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepclust.checkpoint import load_checkpoint
from deepclust.cli import main
from deepclust.config import read_yaml
from deepclust.transfer.config import resolve_transfer
from deepclust.transfer.synthetic import make_voc

# tiny images and few proposals: a step of R-18 Faster R-CNN is about 1 s on one thread
DETECTION = ["batch_size=2", "lr=0.01", "min_size=[64]", "test_min_size=64", "max_size=96", "warmup_iterations=0",
             "roi_batch_size=32", "test_proposals=100", "device=cpu"]
SQUARE = ["batch_size=2", "lr=0.01", "image_size=64", "warmup_iterations=0", "device=cpu"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_voc(root, sizes={"train": 10, "val": 4, "test": 6})
    return root


@pytest.fixture(scope="module")
def resnet18_export(tmp_path_factory):
    """A ResNet-18 checkpoint at 64 px (the ImageNet stem), exported as a torchvision state_dict."""
    out = tmp_path_factory.mktemp("r18")
    assert main(["train", "--method", "random", "--backbone", "resnet18", "--data", "digits", "--epochs", "1",
                 "--out", str(out / "run"), "image_size=64", "subset=32", "test_subset=16", "progress=false"]) == 0
    assert main(["export", "--checkpoint", str(out / "run" / "checkpoint.pt"), "--out", str(out / "r18.pth")]) == 0
    return out / "r18.pth"


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_detection_resnet_fpn_from_an_export(voc_root, resnet18_export, tmp_path):
    out = tmp_path / "det"
    assert main(["transfer", "detection", "--checkpoint", str(resnet18_export), "--data", f"voc2007:{voc_root}",
                 "--out", str(out), "--iterations", "6", "log_every=2", *DETECTION]) == 0
    logged = rows(out)
    steps = [r for r in logged if not r.get("final")]
    assert [r["iteration"] for r in steps] == [2, 4, 6]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(steps[0])
    final = logged[-1]
    assert final["final"] and 0 <= final["ap50"] <= 100 and 0 <= final["ap50_voc07"] <= 100
    assert final["test_images"] == 6
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["next_epoch"] == 6 and any(k.startswith("backbone.fpn.") for k in payload["state"])
    # the stem and layer1 stay as loaded (trainable_layers=3), layer4 was trained
    start = torch.load(resnet18_export, weights_only=True)
    assert torch.equal(payload["state"]["backbone.body.conv1.weight"], start["conv1.weight"])
    assert not torch.equal(payload["state"]["backbone.body.layer4.0.conv1.weight"], start["layer4.0.conv1.weight"])


def test_detection_on_the_convnets_single_map(voc_root, trained_checkpoint, tmp_path):
    out = tmp_path / "det_cn"
    assert main(["transfer", "detection", "--checkpoint", str(trained_checkpoint), "--data", f"voc2007:{voc_root}",
                 "--out", str(out), "--iterations", "2", "log_every=1", *DETECTION]) == 0
    assert 0 <= rows(out)[-1]["ap50"] <= 100


@pytest.mark.parametrize("model", ["fcn", "deeplabv3"])
def test_segmentation_loss_falls(voc_root, resnet18_export, tmp_path, model):
    out = tmp_path / model
    assert main(["transfer", "segmentation", "--checkpoint", str(resnet18_export), "--data", f"voc2007:{voc_root}",
                 "--out", str(out), "--model", model, "--iterations", "8", "log_every=2", *SQUARE]) == 0
    logged = rows(out)
    assert logged[-2]["loss"] < logged[0]["loss"]
    final = logged[-1]
    assert 0 <= final["miou"] <= 100 and set(final["iou_per_class"]) <= {"background", "aeroplane", "bicycle",
                                                                         "bird", "boat"}


def test_multilabel_resume_equals_uninterrupted_run(voc_root, trained_checkpoint, tmp_path, capsys):
    args = ["transfer", "multilabel", "--checkpoint", str(trained_checkpoint), "--data", f"voc2007:{voc_root}",
            "--iterations", "6", "log_every=2", *SQUARE]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "parts"), "stop_after=3"]) == 0
    assert load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["next_epoch"] == 3
    # the rest in a DataLoader worker: the batches depend on (seed, iteration) alone
    assert main([*args, "--out", str(tmp_path / "parts"), "--resume", "num_workers=1"]) == 0
    whole, parts = rows(tmp_path / "whole"), rows(tmp_path / "parts")
    assert [r["loss"] for r in whole if "loss" in r][-1] == [r["loss"] for r in parts if "loss" in r][-1]
    assert whole[-1]["map"] == parts[-1]["map"] and 0 <= whole[-1]["map"] <= 100
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt")["state"] for name in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "whole")]) == 2  # a finished run is never trained over
    assert "transfer-multilabel, 6 of 6 iterations done" in capsys.readouterr().err


@pytest.mark.parametrize("task, extra, message", [
    ("detection", ["--data", "digits"], "give --data voc2007:ROOT"),
    ("segmentation", ["--data", "voc2007:{root}:tset"], "unknown split 'tset'"),
    ("segmentation", ["--data", "voc2007:{root}", "dilation=true"], "dilation=true dilates a resnet50"),
    ("detection", ["--data", "voc2007:{root}", "norm=sync"], "norm must be one of frozen, batch"),
    ("detection", ["--data", "voc2007:{root}", "iterationz=3"], "unknown transfer key 'iterationz'"),
])
def test_bad_input_is_refused_with_the_fix(voc_root, trained_checkpoint, tmp_path, capsys, task, extra, message):
    extra = [e.format(root=voc_root) for e in extra]
    assert main(["transfer", task, "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "bad"),
                 *extra, "device=cpu"]) == 2
    assert message in capsys.readouterr().err


CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "transfer").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_the_shipped_configs_resolve(path):
    cfg = resolve_transfer([read_yaml(path), {"checkpoint": "C", "data": "voc2007:ROOT"}])
    assert cfg.iterations >= 1 and all(step <= cfg.iterations for step in cfg.lr_steps)


def test_the_detection_recipe_is_detectron2s_voc_schedule():
    cfg = resolve_transfer([read_yaml(Path(__file__).parents[1] / "configs/transfer/voc07_detection_r50_fpn.yaml"),
                            {"checkpoint": "C", "data": "voc2007:ROOT"}])
    assert (cfg.iterations, cfg.lr_steps, cfg.lr, cfg.batch_size, cfg.test_min_size) == \
        (18000, [12000, 16000], 0.02, 16, 800)
    assert cfg.min_size == list(range(480, 801, 32))
