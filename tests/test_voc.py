"""Pascal VOC (issue 33): the devkit reader on a generated VOC layout, VOC's metrics by hand on 2-image cases,
ODC's VOC07 SVM protocol, the Detectron2 / mmdetection exports, and the errors bad input gets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from deepclust.checkpoint import CheckpointError
from deepclust.cli import main
from deepclust.data import DataError, load_data, parse_spec
from deepclust.data.voc import VOC_CLASSES, image_targets, read_mask, read_voc
from deepclust.eval.voc_metrics import confusion_matrix, detection_aps, mean_iou, ranking_ap, voc_ap
from deepclust.eval.voc_svm import voc_svm
from deepclust.transfer.frameworks import read_detectron2_file, write_framework_file
from deepclust.transfer.synthetic import make_voc


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return root, make_voc(root)


def test_reader_returns_what_was_written(voc):
    root, written = voc
    for split in ("train", "val", "trainval", "test"):
        records = read_voc("voc2007", root, split, "segmentation")
        assert [r.image_id for r in records] == [w["id"] for w in written[split]]
        for record, item in zip(records, written[split], strict=True):
            assert (record.width, record.height) == (80, 64)
            assert [(o.label, o.box, o.difficult) for o in record.objects] == \
                [(label, tuple(float(v) for v in box), difficult) for label, box, difficult in item["objects"]]
            assert np.array_equal(read_mask(record.mask), item["mask"])
            assert set(np.unique(item["mask"])) <= {0, 1, 2, 3, 4, 255} and 255 in item["mask"]
    # the image-level labels equal the devkit's per-class lists (1 / 0 difficult only / -1)
    records = read_voc("voc2007", root, "trainval")
    targets = image_targets(records)
    base = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    for c, name in enumerate(VOC_CLASSES):
        listed = [int(line.split()[1]) for line in (base / f"{name}_trainval.txt").read_text().splitlines()]
        assert targets[:, c].tolist() == listed
    assert (targets == 0).any() and (targets == 1).any()  # the generator wrote difficult-only classes too


def test_data_spec_defaults_and_images(voc):
    root, written = voc
    assert parse_spec(f"voc2007:{root}", "train") == ("voc2007", str(root), "trainval")
    assert parse_spec(f"voc2007:{root}", "test") == ("voc2007", str(root), "test")
    assert parse_spec(f"voc2012:{root}", "test") == ("voc2012", str(root), "val")
    assert parse_spec(f"voc2007:{root}:val", "train") == ("voc2007", str(root), "val")
    data = load_data(f"voc2007:{root / 'VOCdevkit'}", "train", 32)  # the VOCdevkit folder itself works too
    assert data.images.shape == (len(written["trainval"]), 3, 32, 32) and data.labels is None
    assert data.targets.shape == (len(written["trainval"]), 20)
    sub = data.subset(torch.tensor([1, 3]))
    assert [r.image_id for r in sub.records] == [written["trainval"][i]["id"] for i in (1, 3)]
    assert torch.equal(sub.targets, data.targets[[1, 3]])


@pytest.mark.parametrize("spec, message", [
    ("voc2007:{root}/missing", "no folder"),
    ("voc2007:{root}/VOCdevkit/VOC2007/Annotations", "holds no VOC2007 devkit"),
    ("voc2007:{root}:tset", "unknown split 'tset'"),
    ("voc2012:{root}", "holds no VOC2012 devkit"),
    ("voc2007:", "give the folder of your VOCdevkit"),
])
def test_bad_specs_name_the_problem(voc, spec, message):
    root, _ = voc
    with pytest.raises(DataError, match=message):
        load_data(spec.format(root=root), "train", 32)


def test_missing_split_file_and_annotation(tmp_path):
    make_voc(tmp_path, sizes={"train": 2, "test": 2})
    with pytest.raises(DataError, match="no 'val' split for detection .* splits: test, train"):
        read_voc("voc2007", tmp_path, "val", "detection")
    (tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / "000001.xml").unlink()
    with pytest.raises(DataError, match="no annotation .*000001.xml"):
        read_voc("voc2007", tmp_path, "train")


def test_voc_ap_by_hand():
    # scores .9 .8 .7 .6 of a positive, a negative, a positive and a difficult-only image (ignored)
    scores, targets = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, -1, 1, 0])
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1: area 1/2 * 1 + 1/2 * 2/3; 11-point (6 * 1 + 5 * 2/3) / 11
    assert ranking_ap(scores, targets) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert ranking_ap(scores, targets, eleven_point=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert voc_ap(np.array([1.0]), np.array([1.0])) == 1.0
    assert voc_ap(np.array([1.0]), np.array([1.0]), eleven_point=True) == 1.0


def test_detection_ap_by_hand_on_two_images():
    truths = [
        {"boxes": np.array([[1, 1, 10, 10], [21, 21, 30, 30]], float), "labels": np.array([0, 0]),
         "difficult": np.array([False, True])},
        {"boxes": np.array([[1, 1, 10, 10], [5, 5, 20, 20]], float), "labels": np.array([0, 1]),
         "difficult": np.array([False, False])},
    ]
    detections = [
        {"boxes": np.array([[1, 1, 10, 10], [21, 21, 30, 30], [1, 1, 10, 10]], float),
         "scores": np.array([0.9, 0.8, 0.5]), "labels": np.array([0, 0, 0])},
        {"boxes": np.array([[50, 50, 60, 60], [2, 1, 10, 10]], float), "scores": np.array([0.7, 0.6]),
         "labels": np.array([0, 0])},
    ]
    aps = detection_aps(detections, truths, num_classes=3)
    # class 0, by score: hit, difficult (neither), miss, hit (IoU 90/100), duplicate (a miss); 2 positives:
    # precision 1, 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1/2, 1, 1
    assert aps["ap"][0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert aps["ap07"][0] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert aps["ap"][1] == 0.0 and aps["ap07"][1] == 0.0  # a box never detected
    assert aps["ap"][2] is None  # no ground truth: left out of the mean


def test_mean_iou_by_hand():
    pred = torch.tensor([[0, 1], [1, 1]])
    target = torch.tensor([[0, 1], [255, 0]])
    confusion = confusion_matrix(pred, target, 3)
    assert confusion.sum() == 3  # the void pixel left out
    miou, ious = mean_iou(confusion)
    assert ious == [0.5, 0.5, None] and miou == 0.5


def multi_labels(n: int, classes: int, rate: float, rng: np.random.Generator) -> torch.Tensor:
    targets = np.where(rng.random((n, classes)) < rate, 1, -1)
    targets[np.arange(n), rng.integers(0, classes, n)] = 1  # every image has a class
    return torch.from_numpy(targets.astype(np.int8))


def test_svm_map_is_one_on_separable_features_and_chance_on_random_ones():
    rng = np.random.default_rng(0)
    ytr, yte = multi_labels(60, 4, 0.3, rng), multi_labels(60, 4, 0.3, rng)
    separable = [(y.float() > 0).float() + 0.05 * torch.from_numpy(rng.standard_normal((60, 4))).float()
                 for y in (ytr, yte)]
    result = voc_svm(separable[0], ytr, separable[1], yte, class_names=["a", "b", "c", "d"])
    assert result["voc_svm_map"] == pytest.approx(100.0)
    assert set(result["voc_svm_cost"]) == {"a", "b", "c", "d"}
    ytr, yte = multi_labels(300, 4, 0.3, rng), multi_labels(300, 4, 0.3, rng)
    noise = [torch.from_numpy(rng.standard_normal((300, 32))).float() for _ in range(2)]
    chance = 100 * float((yte == 1).float().mean())
    result = voc_svm(noise[0], ytr, noise[1], yte)
    assert abs(result["voc_svm_map"] - chance) < 10, (result["voc_svm_map"], chance)


def test_svm_ignores_difficult_test_images():
    rng = np.random.default_rng(1)
    ytr = multi_labels(40, 2, 0.4, rng)
    xtr = (ytr.float() > 0).float()
    yte = torch.tensor([[1, -1], [-1, 1], [0, -1], [-1, 0]], dtype=torch.int8)
    xte = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 0.0], [0.0, 5.0]])  # the difficult ones score highest
    assert voc_svm(xtr, ytr, xte, yte)["voc_svm_map"] == pytest.approx(100.0)


def test_eval_voc_svm_cli(voc, trained_checkpoint, capsys):
    root, _ = voc
    assert main(["eval", "--checkpoint", str(trained_checkpoint), "--data", f"voc2007:{root}", "--protocol",
                 "voc-svm", "--layers", "block4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["protocol"] == "voc-svm" and 0 <= result["voc_svm_map"] <= 100
    assert set(result["voc_svm_ap"]) == {"aeroplane", "bicycle", "bird", "boat"}  # the classes the test split has
    assert 0 <= result["voc_svm_map_block4"] <= 100
    assert main(["eval", "--checkpoint", str(trained_checkpoint), "--data", f"voc2007:{root}/nowhere",
                 "--protocol", "voc-svm"]) == 2
    assert "no folder" in capsys.readouterr().err


def detectron2_resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """Detectron2's ResNet-50 (BasicStem + BottleneckBlocks, FrozenBN as conv.norm), its parameter names and
    shapes written out as its build_resnet_backbone makes them."""
    shapes: dict[str, tuple[int, ...]] = {"stem.conv1.weight": (64, 3, 7, 7)}

    def norm(prefix: str, channels: int) -> None:
        for key in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{key}"] = (channels,)

    norm("stem.conv1", 64)
    in_channels = 64
    for stage, blocks in zip(("res2", "res3", "res4", "res5"), (3, 4, 6, 3), strict=True):
        bottleneck = {"res2": 64, "res3": 128, "res4": 256, "res5": 512}[stage]
        out = 4 * bottleneck
        for b in range(blocks):
            prefix = f"{stage}.{b}"
            if b == 0:
                shapes[f"{prefix}.shortcut.weight"] = (out, in_channels, 1, 1)
                norm(f"{prefix}.shortcut", out)
            shapes[f"{prefix}.conv1.weight"] = (bottleneck, in_channels if b == 0 else out, 1, 1)
            shapes[f"{prefix}.conv2.weight"] = (bottleneck, bottleneck, 3, 3)
            shapes[f"{prefix}.conv3.weight"] = (out, bottleneck, 1, 1)
            for conv, channels in (("conv1", bottleneck), ("conv2", bottleneck), ("conv3", out)):
                norm(f"{prefix}.{conv}", channels)
        in_channels = out
    return shapes


def test_detectron2_export_has_detectron2s_resnet50_names_and_shapes(tmp_path):
    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Identity()
    state = net.state_dict()
    how = write_framework_file(state, "resnet50", tmp_path / "r50.pkl", "detectron2", (0.485, 0.456, 0.406),
                               (0.229, 0.224, 0.225), {"method": "is"})
    saved = read_detectron2_file(tmp_path / "r50.pkl")
    assert saved["matching_heuristics"] is True and saved["__author__"].startswith("deepclust")
    assert {k: v.shape for k, v in saved["model"].items()} == detectron2_resnet50_shapes()
    assert np.array_equal(saved["model"]["res3.0.shortcut.norm.running_var"],
                          state["layer2.0.downsample.1.running_var"].numpy())
    assert "MODEL.RESNETS.DEPTH 50" in how and "STRIDE_IN_1X1 False" in how and "123.675" in how
    write_framework_file(state, "resnet50", tmp_path / "r50.pth", "mmdetection", (0.5,) * 3, (0.5,) * 3, {})
    mm = torch.load(tmp_path / "r50.pth", weights_only=True)["state_dict"]
    mm_net = torchvision.models.resnet50(weights=None)
    mm_net.fc = torch.nn.Identity()
    mm_net.load_state_dict(mm, strict=True)  # mmdetection's ResNet has torchvision's names


def test_export_detectron2_cli_and_refusals(tmp_path, trained_checkpoint, capsys):
    assert main(["export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "c.pkl"),
                 "--format", "detectron2"]) == 2
    assert "backbone convnet has none" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "c.safetensors"),
                 "--format", "detectron2"]) == 2
    assert "name it *.pkl" in capsys.readouterr().err
    cifar = torchvision.models.resnet18(weights=None)
    cifar.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    with pytest.raises(CheckpointError, match="CIFAR stem"):
        write_framework_file(cifar.state_dict(), "resnet18_cifar", tmp_path / "c.pkl", "detectron2", (0.5,) * 3,
                             (0.5,) * 3, {})


def test_voc_svm_takes_single_label_data_as_one_hot():
    from deepclust.commands.voc_svm import multi_labels
    from deepclust.data import ImageData

    data = ImageData(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.tensor([2, 0, 2]), "three", ["a", "b", "c"])
    assert multi_labels(data).tolist() == [[-1, -1, 1], [1, -1, -1], [-1, -1, 1]]
    with pytest.raises(DataError, match="voc2007:ROOT"):
        multi_labels(ImageData(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), None, "unlabelled"))
