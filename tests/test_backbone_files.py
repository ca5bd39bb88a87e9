"""Backbone files of any origin as ``train --init`` and as ``--checkpoint`` of cluster / embed / eval: a deepclust
export, torchvision state_dicts saved with ``torch.save(model.state_dict())``, a timm-named safetensors file
(written here: timm is not installed), and the errors for another architecture or another stem."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import tiny_npz
from safetensors.torch import load_file, save_file

from deepclust import augment
from deepclust.backbone_files import read_backbone_file
from deepclust.checkpoint import CheckpointError, load_checkpoint
from deepclust.cli import main
from deepclust.config import resolve
from deepclust.train import setup


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def torchvision_net(name: str, seed: int = 123, cifar_stem: bool = False) -> nn.Module:
    """A torchvision model with its own random weights and BatchNorm statistics (not the defaults a fresh
    deepclust backbone also has), so equal tensors after loading mean they were loaded."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)()
    if cifar_stem:  # what deepclust export writes for resnet18_cifar, and how CIFAR ResNets are built elsewhere
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return net


def save_state(net: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    state = net.state_dict()
    torch.save(state, path)  # exactly what a user does with their network
    return state


def setup_from(tmp_path: Path, init: Path, backbone: str, image_size: int, **keys):
    """train.setup() of an NPID run started from ``init`` on 8 tiny images (nothing trained)."""
    data = tiny_npz(tmp_path, n=8, size=16)
    cfg, hp = resolve([{"method": "npid", "data": data, "backbone": backbone, "image_size": image_size,
                        "init": str(init), "out": str(tmp_path / "run"), "progress": False, "device": "cpu",
                        "batch_size": 4, **keys}])
    return setup(cfg, hp)


def assert_trunk_equals(run, state: dict[str, torch.Tensor]) -> None:
    trunk = run.method.backbone.trunk.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is dropped
    assert kept and set(kept) <= set(trunk)
    assert all(torch.equal(trunk[k], v) for k, v in kept.items())
    assert not any(k.startswith("fc.") for k in trunk)


def test_exported_backbone_loads_as_init(trained_checkpoint, tmp_path, capsys, tiny_train_args, caplog):
    export = tmp_path / "convnet.safetensors"
    assert run_cli(capsys, "export", "--checkpoint", trained_checkpoint, "--out", export)[0] == 0
    # random-init never trains: its checkpoint holds the backbone exactly as it was initialised
    with caplog.at_level(logging.INFO, logger="deepclust"):
        rc, _, err = run_cli(capsys, "train", "--method", "random", "--out", tmp_path / "r", "--init", export,
                             *tiny_train_args)
    assert rc == 0, err
    state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["state"]
    exported = load_file(export)
    assert all(torch.equal(state[f"backbone.trunk.{k}"], v) for k, v in exported.items())
    trained = load_checkpoint(trained_checkpoint)["state"]
    assert not torch.equal(state["backbone.head.weight"], trained["backbone.head.weight"])  # not exported: fresh
    assert "deepclust export of npid" in caplog.text and "embedding head" in caplog.text
    assert "start fresh" in caplog.text


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_as_init(name, tmp_path):
    state = save_state(torchvision_net(name), tmp_path / f"{name}.pth")
    run = setup_from(tmp_path, tmp_path / f"{name}.pth", name, 64)  # 64 px and up: the ImageNet 7x7 stem
    assert_trunk_equals(run, state)


def test_timm_named_safetensors_loads_as_init(tmp_path, caplog):
    # timm's ResNets use torchvision's names; its hub files are safetensors with {"format": "pt"} metadata.
    # BatchNorm step counters left out: they are not parameters, and start at 0
    state = {k: v.contiguous() for k, v in torchvision_net("resnet18", seed=5).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="deepclust"):
        run = setup_from(tmp_path, tmp_path / "model.safetensors", "resnet18", 64)
    assert_trunk_equals(run, state)
    assert "not loaded: its classifier (fc." in caplog.text and "fc.weight" in caplog.text


def test_a_file_of_another_architecture_fails_naming_keys(trained_checkpoint, tmp_path, capsys):
    save_state(torchvision_net("resnet50"), tmp_path / "r50.pth")
    with pytest.raises(CheckpointError) as err:
        setup_from(tmp_path, tmp_path / "r50.pth", "resnet18", 64)
    text = str(err.value)
    assert "does not fit backbone resnet18" in text and "unexpected keys layer1.0.conv3.weight" in text
    assert "looks like resnet50" in text and "--backbone resnet50" in text
    # a ConvNet's export into a ResNet: on the command line, exit 2 naming the keys on both sides
    export = tmp_path / "convnet.safetensors"
    assert run_cli(capsys, "export", "--checkpoint", trained_checkpoint, "--out", export)[0] == 0
    rc, _, err_text = run_cli(capsys, "train", "--method", "npid", "--out", tmp_path / "x", "--init", export,
                              "--data", tiny_npz(tmp_path, n=8), "--backbone", "resnet18", "image_size=64",
                              "progress=false", "batch_size=4")
    assert rc == 2
    assert "missing keys conv1.weight" in err_text and "unexpected keys 0.weight" in err_text
    assert "looks like convnet" in err_text
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_a_cifar_stem_file_into_resnet18_names_the_stem_fix(tmp_path):
    save_state(torchvision_net("resnet18", cifar_stem=True), tmp_path / "cifar.pth")
    assert read_backbone_file(tmp_path / "cifar.pth").name == "resnet18_cifar"
    with pytest.raises(CheckpointError, match="CIFAR 3x3 stem") as err:
        setup_from(tmp_path, tmp_path / "cifar.pth", "resnet18", 64)
    assert "--backbone resnet18_cifar" in str(err.value)
    # and the other way: an ImageNet file into the CIFAR stem names the image size that builds its stem
    save_state(torchvision_net("resnet18"), tmp_path / "imagenet.pth")
    with pytest.raises(CheckpointError, match="ImageNet 7x7 stem") as err:
        setup_from(tmp_path, tmp_path / "imagenet.pth", "resnet18", 32)
    assert "--backbone resnet18 at an image size of 64 or more" in str(err.value)
    # below 64 px resnet18 is the CIFAR ResNet: the CIFAR-stem file fits it there
    assert_trunk_equals(setup_from(tmp_path, tmp_path / "cifar.pth", "resnet18", 32),
                        torch.load(tmp_path / "cifar.pth", weights_only=True))


def test_cluster_k_on_a_torchvision_file_without_training_writes_the_csv(tmp_path, capsys):
    save_state(torchvision_net("resnet18"), tmp_path / "resnet18.pth")
    data = tiny_npz(tmp_path, n=24, size=16)
    out = tmp_path / "clusters.csv"
    rc, stdout, err = run_cli(capsys, "cluster", "--k", "3", "--data", data, "--checkpoint",
                              tmp_path / "resnet18.pth", "--out", out)
    assert rc == 0, err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and {int(r["cluster"]) for r in rows} <= {0, 1, 2}
    assert "k = 3, on the pooled features" in stdout and "NMI" in stdout
    # without --k a plain file has no clusters of its own: a clear error, exit 2
    rc, _, err = run_cli(capsys, "cluster", "--data", data, "--checkpoint", tmp_path / "resnet18.pth", "--out", out)
    assert rc == 2 and "--k K" in err


def test_embed_of_a_torchvision_file_gives_the_networks_own_features(tmp_path, capsys):
    net = torchvision_net("resnet18")
    save_state(net, tmp_path / "resnet18.pth")
    data = tiny_npz(tmp_path, n=6, size=16)
    rc, _, err = run_cli(capsys, "embed", "--checkpoint", tmp_path / "resnet18.pth", "--data", data,
                         "--image-size", "16", "--out", tmp_path / "e.npz")  # a 7x7 stem at 16 px runs too
    assert rc == 0, err
    feats = np.load(tmp_path / "e.npz")["features"]
    net.fc = nn.Identity()
    images = torch.from_numpy(np.load(data)["images"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = torch.nn.functional.normalize(net.eval()(augment.test_transform(images, 16))).numpy()  # embed: L2
    assert feats.shape == (6, 512)
    np.testing.assert_allclose(feats, want, atol=1e-5)  # conv-BN folded: float rounding
    rc, _, err = run_cli(capsys, "embed", "--checkpoint", tmp_path / "resnet18.pth", "--data", data, "--feature",
                         "embedding", "--out", tmp_path / "e2.npz")
    assert rc == 2 and "no trained embedding head" in err


def test_resnet18_run_exports_as_torchvision_resnet18_and_loads_back_as_init(tmp_path, capsys):
    run = tmp_path / "r18"
    data = tiny_npz(tmp_path, n=8, size=16)
    assert main(["train", "--method", "random", "--backbone", "resnet18", "--data", data, "--out", str(run),
                 "image_size=64", "progress=false", "batch_size=4"]) == 0
    rc, stdout, _ = run_cli(capsys, "export", "--checkpoint", run / "checkpoint.pt", "--out", tmp_path / "r18.pth")
    assert rc == 0 and "torchvision.models.resnet18()" in stdout and "CIFAR stem" not in stdout
    state = torch.load(tmp_path / "r18.pth", weights_only=True)
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(state, strict=True)  # the ImageNet stem: torchvision's resnet18 as it is
    assert read_backbone_file(tmp_path / "r18.pth").name == "resnet18"
    assert_trunk_equals(setup_from(tmp_path, tmp_path / "r18.pth", "resnet18", 64), state)
