"""timm backbones (``--backbone timm:NAME``) and ``cluster --features``: tiny random timm models saved to files in the
test (nothing downloaded). ``test_vit`` is timm's own 6-block, 64-wide ViT for tests; at 16-32 px it sees 1-4
patches, which is all a CPU test needs."""

from __future__ import annotations

import csv
import dataclasses
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import run_cfg, tiny_npz
from safetensors.torch import load_file
from sklearn.metrics import normalized_mutual_info_score
from timm.layers import resample_abs_pos_embed
from torch._subclasses.fake_tensor import FakeTensorMode

from deepclust.augment import Augment
from deepclust.backbone_files import init_backbone, read_backbone_file
from deepclust.backbones import Backbone
from deepclust.checkpoint import load_checkpoint
from deepclust.cli import main
from deepclust.config import ConfigError, resolve
from deepclust.device_memory import activation_bytes, plan_training_memory
from deepclust.distributed import GlobalBatchNorm, global_batchnorm
from deepclust.epoch import EpochCursor, batch_bounds, epoch_batches, run_steps
from deepclust.eval.layers import layer_features
from deepclust.methods import METHODS
from deepclust.safety import LossGuard
from deepclust.train import train

# A ViT, a ConvNeXt and a timm ResNet, each at 32 px (the ViT's patches of 16: a 2 x 2 grid).
FAMILIES = ["test_vit", "convnext_atto", "resnet10t"]
VIT = "test_vit"
# small cluster counts for the methods that have them, and multi-crop's small crops (9 px: a padded patch)
METHOD_KEYS = {"k": 4, "prototypes": 8, "min_clusters": 4, "small_crops": 2}


def timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A random timm model as a user's file would hold it: its classifier too (num_classes as timm makes it)."""
    torch.manual_seed(seed)
    if name == VIT:
        kwargs.setdefault("img_size", 32)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def timm_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's own pooled features of uint8 images, normalised with the model's own mean and std."""
    cfg = model.pretrained_cfg
    x = images.float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_init_brings_the_weights_unchanged_and_embed_is_timms_forward(tmp_path, name):
    model = timm_model(name)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)  # with its classifier: dropped, and said so
    backbone = Backbone(f"timm:{name}", 32)
    spec = {"name": f"timm:{name}", "image_size": 32, "embed_dim": 128, "sobel": False, "width": 32}
    init_backbone(backbone, path, spec, 32)
    mine, theirs = backbone.trunk.state_dict(), model.state_dict()
    assert mine and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert backbone.mean == tuple(model.pretrained_cfg["mean"])  # 0.5 for the ViT, ImageNet's for the others

    data = tiny_npz(tmp_path, n=12, size=32)
    out = tmp_path / "feats.npz"
    assert main(["embed", "--checkpoint", str(path), "--backbone", f"timm:{name}", "--image-size", "32",
                 "--data", data, "--out", str(out), "--feature", "pooled"]) == 0
    images = torch.from_numpy(np.load(data)["images"]).permute(0, 3, 1, 2).contiguous()
    want = torch.nn.functional.normalize(timm_features(model, images), dim=1)  # embed's features: L2-normalised
    got = torch.from_numpy(np.load(out)["features"])
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5


def test_a_file_of_another_architecture_is_refused_naming_its_keys(tmp_path, capsys):
    path = tmp_path / "convnext.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm_model("convnext_atto").state_dict().items()}, str(path))
    data = tiny_npz(tmp_path, n=8, size=32)
    assert main(["embed", "--checkpoint", str(path), "--backbone", f"timm:{VIT}", "--image-size", "32",
                 "--data", data, "--out", str(tmp_path / "f.npz")]) == 2
    err = capsys.readouterr().err
    assert "does not fit backbone timm:test_vit" in err
    assert "missing keys cls_token, pos_embed" in err and "unexpected keys stages.0.blocks.0" in err


def test_dinov2_names_and_another_grid_load_with_the_position_embeddings_resampled(tmp_path):
    """A DINOv2-style file (its mask_token) made at timm's default 160 px loads into the model at 32 px: the
    position embeddings resampled to the 2 x 2 grid as timm does it, every other tensor unchanged."""
    model = timm_model(VIT, img_size=160)
    state = {**model.state_dict(), "mask_token": torch.zeros(1, 64)}
    torch.save(state, tmp_path / "dinov2.pth")
    backbone = Backbone(f"timm:{VIT}", 32)
    spec = {"name": f"timm:{VIT}", "image_size": 32, "embed_dim": 128, "sobel": False, "width": 32}
    init_backbone(backbone, tmp_path / "dinov2.pth", spec, 32)
    mine = backbone.trunk.state_dict()
    want_pos = resample_abs_pos_embed(state["pos_embed"], new_size=(2, 2), num_prefix_tokens=1)
    assert mine["pos_embed"].shape == (1, 5, 64) and torch.allclose(mine["pos_embed"], want_pos)
    assert all(torch.equal(mine[k], state[k]) for k in mine if k != "pos_embed")


def test_sizes_a_model_cannot_take_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="image_size=48 or 32"):  # 40 px: 16 px patches do not tile it
        Backbone(f"timm:{VIT}", 40)
    with pytest.raises(ConfigError, match="at least 32"):  # ConvNeXt's total stride is 32
        Backbone("timm:convnext_atto", 16)
    with pytest.raises(ConfigError, match="unknown backbone 'timm:no_such_net': timm has no model 'no_such_net'"):
        resolve([{"backbone": "timm:no_such_net"}])


def test_without_timm_the_error_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed: its import fails
    assert main(["train", "--method", "is", "--backbone", "timm:test_vit", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs timm, which is not installed: pip install 'deepclust[timm]'" in err


def test_augmentation_normalises_with_the_backbones_mean_and_std():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    plain = Augment(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, flip_p=0.0,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = plain(images, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images.float() / 255 * 2 - 1, atol=1e-5)


def method_keys(name: str) -> dict:
    fields = {f.name for f in dataclasses.fields(METHODS[name].Config)}
    return {k: v for k, v in METHOD_KEYS.items() if k in fields}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_tiny_vit_on_the_cpu(tmp_path, method):
    start = tmp_path / "start.pth"
    torch.save(timm_model(VIT, img_size=16, num_classes=0).state_dict(), start)
    cfg, hp = run_cfg(tmp_path, method, backbone=f"timm:{VIT}", init=str(start), epochs=1, batch_size=16,
                      subset=32, test_subset=32, eval_every=0, **method_keys(method))
    row = train(cfg, hp)
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert payload["backbone"]["name"] == f"timm:{VIT}" and payload["backbone"]["image_size"] == 16
    trained = payload["state"]["backbone.trunk.blocks.0.attn.qkv.weight"]
    before = torch.load(start, weights_only=True)["blocks.0.attn.qkv.weight"]
    if method == "random":
        assert torch.equal(trained, before)
    else:
        assert np.isfinite(row["loss"]) and not torch.equal(trained, before)
    assert row["knn_top1"] is not None


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("vit")
    cfg, hp = run_cfg(tmp, "is", backbone=f"timm:{VIT}", epochs=1, batch_size=16, subset=32, eval_every=0)
    train(cfg, hp)
    return tmp / "run"


@pytest.mark.parametrize("name", [VIT, "test_resnet"])
def test_export_loads_strictly_into_timms_own_model(tmp_path, vit_run, name, capsys):
    run = vit_run
    if name != VIT:
        cfg, hp = run_cfg(tmp_path, "is", backbone=f"timm:{name}", epochs=1, batch_size=16, subset=32,
                          eval_every=0)
        train(cfg, hp)
        run = tmp_path / "run"
    out = tmp_path / "backbone.safetensors"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), "--format", "timm"]) == 0
    printed = capsys.readouterr().out
    # the ViT with its training size (its position embeddings' grid); the ResNet exactly as timm names it
    size = ", img_size=16" if name == VIT else ""
    assert f"timm.create_model({name!r}, num_classes=0{size})" in printed
    model = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": 16} if name == VIT else {}))
    model.load_state_dict(load_file(str(out)), strict=True)
    trained = load_checkpoint(run / "checkpoint.pt")["state"]
    assert all(torch.equal(v, trained[f"backbone.trunk.{k}"]) for k, v in model.state_dict().items())
    assert read_backbone_file(out).name == f"timm:{name}"


def test_eval_per_layer_probe_runs_over_the_vit_blocks(vit_run, capsys):
    assert main(["eval", "--checkpoint", str(vit_run / "checkpoint.pt"), "--data",
                 str(vit_run.parent / "tiny.npz"), "--test-data", str(vit_run.parent / "tiny.npz"),
                 "--protocol", "linear", "--layers", "all", "--json"]) == 0
    printed = capsys.readouterr().out
    assert all(f"blocks.{i}" in printed for i in range(6))  # test_vit's 6 blocks
    feats = layer_features(Backbone(f"timm:{VIT}", 16), torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    assert list(feats) == [f"blocks.{i}" for i in range(6)] and all(f.shape == (3, 64) for f in feats.values())


def test_the_gpu_memory_plan_measures_a_vit():
    backbone = Backbone(f"timm:{VIT}", 32)
    small, large = activation_bytes(backbone, 32, False), activation_bytes(backbone, 64, False)
    assert 0 < small < large  # 4 patches against 16
    method = METHODS["npid"](backbone, 100, METHODS["npid"].Config())
    plan = plan_training_memory(method, 100, 32, 16, False)
    assert plan.parts["activations"] == 16 * small and plan.parts["state"] > 0


def test_the_step_loop_on_fake_cuda_with_a_vit():
    """test_fake_cuda's check (no host sync, no device mix) on the trainer's step loop with a timm ViT."""
    import test_fake_cuda as fc

    torch.manual_seed(0)
    images, labels = fc.tiny_images()
    cls = METHODS["npid"]
    method = cls(Backbone(f"timm:{VIT}", fc.SIZE), fc.N, cls.Config())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fc.to_fake_cuda(method, mode)
    order = torch.randperm(fc.N, generator=torch.Generator().manual_seed(1))
    bounds = batch_bounds(2 * fc.BATCH, fc.BATCH)
    with mode, fc.HostTensorCheck():
        pixels = torch.zeros(fc.N, 3, fc.SIZE, fc.SIZE, dtype=torch.uint8, device=fc.CUDA)
        cfg = types.SimpleNamespace(num_workers=0, channels_last=True)
        run = types.SimpleNamespace(cfg=cfg, images=pixels, model=method, method=method, device=fc.CUDA,
                                    optimizer=None)
        cursor = EpochCursor(order, 0, torch.Generator(), None, torch.zeros((), device=fc.CUDA))
        guard = LossGuard("stop", Path("unused"), lambda step: f"step {step}")
        batches = epoch_batches(run, cursor, bounds, [slice(0, fc.BATCH)] * len(bounds), seed=0)
        done = []
        augment = Augment(fc.SIZE, mean=method.backbone.mean, std=method.backbone.std)
        run_steps(run, cursor, batches, bounds, augment, guard, None, lambda d, stop: done.append(d), learn=False)
        assert done == [1, 2] and cursor.loss_sum.device == fc.CUDA


def test_torchrun_makes_plain_batchnorm_global_and_refuses_one_with_an_activation_in_it():
    resnet = global_batchnorm(timm.create_model("test_resnet", pretrained=False, num_classes=0))
    norms = [m for m in resnet.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, GlobalBatchNorm) for m in norms)
    with pytest.raises(ConfigError, match="BatchNormAct2d"):  # swapped, its activation would be lost
        global_batchnorm(timm.create_model("test_efficientnet", pretrained=False, num_classes=0))


def blobs(tmp_path: Path, n_per: int = 40, k: int = 5, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Planted clusters: k well-separated directions, rows shuffled."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(k), n_per)
    feats = rng.normal(size=(k, dim))[labels] * 10 + rng.normal(size=(k * n_per, dim))
    order = rng.permutation(len(labels))
    return feats[order].astype(np.float32), labels[order]


def read_csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cluster_features_made_elsewhere_recovers_planted_clusters(tmp_path, capsys):
    feats, labels = blobs(tmp_path)
    names = np.array([f"img{i:03d}.jpg" for i in range(len(labels))])
    np.savez(tmp_path / "clip.npz", features=feats, paths=names, labels=labels)
    assert main(["cluster", "--features", str(tmp_path / "clip.npz"), "--k", "5", "--out",
                 str(tmp_path / "a.csv")]) == 0
    assert "NMI 1.0000" in capsys.readouterr().out
    rows = read_csv_rows(tmp_path / "a.csv")
    assert list(rows[0]) == ["path", "cluster", "distance", "confidence", "label"]  # cluster's own columns
    assert [r["path"] for r in rows] == list(names)
    assert normalized_mutual_info_score(labels, [int(r["cluster"]) for r in rows]) == pytest.approx(1.0)

    np.save(tmp_path / "x.npy", feats)  # an .npy and a text file of paths
    (tmp_path / "paths.txt").write_text("\n".join(f"dir/{n}" for n in names) + "\n")
    assert main(["cluster", "--features", str(tmp_path / "x.npy"), "--paths", str(tmp_path / "paths.txt"),
                 "--k", "5", "--out", str(tmp_path / "b.csv")]) == 0
    rows = read_csv_rows(tmp_path / "b.csv")
    assert rows[0]["path"] == f"dir/{names[0]}" and "label" not in rows[0]
    assert normalized_mutual_info_score(labels, [int(r["cluster"]) for r in rows]) == pytest.approx(1.0)

    (tmp_path / "short.txt").write_text("a.jpg\nb.jpg\n")
    assert main(["cluster", "--features", str(tmp_path / "x.npy"), "--paths", str(tmp_path / "short.txt"),
                 "--k", "5", "--out", str(tmp_path / "c.csv")]) == 2
    assert "lists 2 paths for 200 feature rows" in capsys.readouterr().err
