"""The papers' other protocols: few-shot episodes, low-shot SVMs, the SGD linear probe, long-tail subsets,
per-layer probes, --protocol all, transfer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_npz

from deepclust.backbones import Backbone
from deepclust.cli import main
from deepclust.data import DataError, load_data, load_train_test, long_tail_counts
from deepclust.eval import extract_features, fewshot_accuracy, lowshot_svm, sgd_linear_probe
from deepclust.eval.layers import layer_features


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_json(capsys, *argv) -> dict:
    rc = main([str(a) for a in argv] + ["--json"])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)


# --- few-shot ------------------------------------------------------------------------------------


def test_fewshot_separable_features_are_perfect_at_one_shot():
    labels = torch.arange(8).repeat_interleave(20)
    feats = F.one_hot(labels, 8).float() + 0.05 * torch.randn(160, 8, generator=gen(0))  # one axis per class
    score = fewshot_accuracy(feats, labels, ways=5, shots=1, queries=10, episodes=200)
    assert score == {"mean": 100.0, "ci95": 0.0}


def test_fewshot_random_features_are_at_chance():
    labels = torch.arange(10).repeat_interleave(40)
    feats = torch.randn(400, 32, generator=gen(1))
    for ways in (2, 5):
        score = fewshot_accuracy(feats, labels, ways=ways, shots=5, queries=15, episodes=800, seed=3)
        assert 0 < score["ci95"] < 2.0
        assert abs(score["mean"] - 100.0 / ways) < 3 * score["ci95"]


def test_fewshot_more_shots_help_on_noisy_clusters_and_seed_fixes_the_draws():
    labels = torch.arange(6).repeat_interleave(30)
    centres = torch.randn(6, 16, generator=gen(2))
    feats = centres[labels] + 1.5 * torch.randn(180, 16, generator=gen(3))
    one = fewshot_accuracy(feats, labels, ways=5, shots=1, episodes=300, seed=7)
    five = fewshot_accuracy(feats, labels, ways=5, shots=5, episodes=300, seed=7)
    assert five["mean"] - five["ci95"] > one["mean"] + one["ci95"]  # prototypes of 5 beat single images
    assert fewshot_accuracy(feats, labels, ways=5, shots=1, episodes=300, seed=7) == one
    assert fewshot_accuracy(feats, labels, ways=5, shots=1, episodes=300, seed=8) != one
    # cosine throughout: rescaling each image's feature changes nothing (raw-mean prototypes would change)
    scale = torch.rand(180, 1, generator=gen(4)) * 20 + 0.05
    assert fewshot_accuracy(feats * scale, labels, ways=5, shots=5, episodes=300, seed=7) == pytest.approx(five)


def test_fewshot_refuses_episodes_the_data_cannot_fill():
    feats = torch.randn(5, 4, generator=gen(4))
    labels = torch.tensor([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="need 2 classes of at least 3 images"):
        fewshot_accuracy(feats, labels, ways=2, shots=2, queries=1)
    with pytest.raises(ValueError, match="ways >= 2"):
        fewshot_accuracy(feats, labels, ways=1)


def test_eval_fewshot_cli_reports_both_shots(trained_checkpoint, capsys):
    got = run_json(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits", "--protocol", "fewshot",
                   "--episodes", "100")
    for shots in (1, 5):
        assert 20 < got[f"fewshot_5way_{shots}shot"] <= 100  # chance is 20% at 5 ways
        assert 0 < got[f"fewshot_5way_{shots}shot_ci95"] < 10
    assert got["fewshot_5way_5shot"] > got["fewshot_5way_1shot"]
    assert got["fewshot_episodes"] == 100


# --- low-shot SVMs ------------------------------------------------------------------------------


def one_hot_features(classes: int, per_class: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(classes).repeat_interleave(per_class)
    return F.one_hot(labels, classes).float() + noise * torch.randn(len(labels), classes, generator=gen(seed)), labels


def test_lowshot_separable_features_give_full_map_at_one_shot():
    train, ytr = one_hot_features(8, 20, 0.05, 10)
    test, yte = one_hot_features(8, 30, 0.05, 11)
    got = lowshot_svm(train, ytr, test, yte, shots=(1, 4), draws=3)
    assert got == pytest.approx({"lowshot_map_1shot": 100.0, "lowshot_map_1shot_std": 0.0, "lowshot_map_4shot": 100.0,
                                 "lowshot_map_4shot_std": 0.0, "lowshot_map": 100.0}, abs=1e-9)


def test_lowshot_random_features_are_at_chance_and_the_draws_follow_the_seed():
    ytr, yte = torch.arange(5).repeat_interleave(20), torch.arange(5).repeat_interleave(400)
    train, test = torch.randn(100, 16, generator=gen(12)), torch.randn(2000, 16, generator=gen(13))
    got = lowshot_svm(train, ytr, test, yte, shots=(1, 8), draws=4, seed=3)
    # the average precision of a random ranking is about the positives' share: 1 / 5
    assert abs(got["lowshot_map"] - 20.0) < 2.0 and got["lowshot_map_1shot_std"] > 0
    assert lowshot_svm(train, ytr, test, yte, shots=(1, 8), draws=4, seed=3) == got
    assert lowshot_svm(train, ytr, test, yte, shots=(1, 8), draws=4, seed=4) != got
    # noisy clusters: more positives per class give better SVMs
    train, ytr = one_hot_features(5, 20, 0.6, 14)
    test, yte = one_hot_features(5, 100, 0.6, 15)
    got = lowshot_svm(train, ytr, test, yte, shots=(1, 16), draws=4)
    assert got["lowshot_map_16shot"] > got["lowshot_map_1shot"] + got["lowshot_map_1shot_std"]
    with pytest.raises(ValueError, match="the smallest class has 20; lower the shot values"):
        lowshot_svm(train, ytr, test, yte, shots=(32,))


def test_eval_lowshot_cli_and_all(trained_checkpoint, capsys):
    got = run_json(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits", "--protocol", "lowshot",
                   "--lowshot-shots", "1", "8", "--lowshot-draws", "2")
    assert got["lowshot_draws"] == 2 and got["svm_cost"] == 1.0
    assert 10 < got["lowshot_map_1shot"] < got["lowshot_map_8shot"] <= 100  # chance is about 10% on digits
    assert got["lowshot_map"] == pytest.approx((got["lowshot_map_1shot"] + got["lowshot_map_8shot"]) / 2)
    rc = main(["eval", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--protocol", "lowshot",
               "--lowshot-shots", "500"])
    assert rc == 2 and "500 positives per class need 500 training images" in capsys.readouterr().err


# --- SGD linear probe ----------------------------------------------------------------------------


def colour_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 16 px images whose class (of 3) is the bright channel: any crop or flip keeps it."""
    labels = torch.arange(n) % 3
    images = torch.randint(0, 80, (n, 3, 16, 16), generator=gen(seed))
    images[torch.arange(n), labels] += 150
    return images.to(torch.uint8), labels


def test_sgd_probe_learns_separable_data_and_leaves_the_backbone_alone():
    torch.manual_seed(0)
    model = Backbone("convnet", 16, width=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, ytr = colour_images(96, 20)
    test, yte = colour_images(48, 21)
    acc = sgd_linear_probe(model, train, ytr, test, yte, epochs=12, batch_size=32, seed=1)
    assert acc == 100.0
    assert model.training  # mode restored
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_eval_sgd_probe_cli(trained_checkpoint, capsys):
    got = run_json(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits", "--protocol", "linear",
                   "--probe", "sgd", "--probe-epochs", "4")
    assert got["probe"] == "sgd" and got["probe_epochs"] == 4
    assert 20 < got["linear_top1"] <= 100  # chance is 10% on digits
    rc = main(["eval", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--probe", "sgd"])
    assert rc == 2 and "use --protocol linear or all, not knn" in capsys.readouterr().err


# --- long-tail subset ----------------------------------------------------------------------------


def test_long_tail_subset_has_the_requested_class_ratios(tmp_path):
    labels = np.repeat(np.arange(10), 130)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "bal.npz", images=rng.integers(0, 256, (1300, 8, 8), dtype=np.uint8), labels=labels)
    data = load_data(str(tmp_path / "bal.npz"), subset_imbalance=64, subset_seed=1)
    counts = torch.bincount(data.labels, minlength=10).tolist()
    assert counts == long_tail_counts([130] * 10, 64)
    assert counts[0] == 130 and counts[-1] == 2 and counts == sorted(counts, reverse=True)
    # exponential profile: each class keeps 64^(-1/9) of the one before, up to rounding
    for c in range(10):
        assert counts[c] == pytest.approx(130 * 64 ** (-c / 9), abs=0.5)
    assert long_tail_counts([128] * 7, 64) == [128, 64, 32, 16, 8, 4, 2]  # ratio exactly 64
    assert long_tail_counts([50, 40, 60], 1) == [40, 40, 40]
    # reproducible from the seed; another seed draws other images of the same counts
    again = load_data(str(tmp_path / "bal.npz"), subset_imbalance=64, subset_seed=1)
    other = load_data(str(tmp_path / "bal.npz"), subset_imbalance=64, subset_seed=2)
    assert torch.equal(again.images, data.images)
    assert torch.bincount(other.labels).tolist() == counts and not torch.equal(other.images, data.images)


def test_long_tail_subset_trains_on_the_imbalanced_set_and_tests_on_the_balanced_one(tmp_path, capsys):
    train, test = load_train_test("digits", subset_imbalance=16)
    counts = torch.bincount(train.labels).tolist()
    assert max(counts) / min(counts) == pytest.approx(16, rel=0.05)
    assert len(test) == 359  # the whole balanced test split
    np.savez(tmp_path / "u.npz", images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match="needs class labels"):
        load_data(str(tmp_path / "u.npz"), subset_imbalance=4)
    rc = main(["train", "--method", "npid", "--data", "digits", "--out", str(tmp_path / "r"), "subset_imbalance=0.5"])
    assert rc == 2 and "subset_imbalance must be at least 1" in capsys.readouterr().err


# --- per-layer probes ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, dims", [
    # ConvNet width 8 on 32 px: 8 ch at 32x32 -> 16x16 grid, 16 at 16 -> 11x11, 32 at 8 -> 8x8, 64 at 4 -> 4x4
    ("convnet", {"block1": 2048, "block2": 1936, "block3": 2048, "block4": 1024}),
    ("resnet18_cifar", {"layer1": 64 * 6 * 6, "layer2": 128 * 4 * 4, "layer3": 256 * 3 * 3, "layer4": 512 * 2 * 2}),
    ("alexnet_bn", {"conv1": 96 * 5 * 5, "conv2": 256 * 3 * 3, "conv3": 384 * 2 * 2, "conv4": 384 * 2 * 2,
                    "conv5": 256 * 3 * 3}),
])
def test_layer_features_shapes_and_last_stage_matches_pooled_features(name, dims):
    torch.manual_seed(0)
    model = Backbone(name, 32, width=8).train()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=gen(5))
    feats = layer_features(model, images)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {k: (5, d) for k, d in dims.items()}
    assert model.training  # mode restored
    last = list(dims)[-1]
    if name != "alexnet_bn":  # AlexNet max-pools after conv5: its pooled features are not conv5's mean
        # a 1x1 grid of the last stage is the trunk's global average pool: the hooks sit on the right modules
        one = layer_features(model, images, [last], target_dim=1)[last]
        torch.testing.assert_close(one, extract_features(model, images, "pooled", normalize=False),
                                   atol=1e-4, rtol=1e-4)


def test_eval_linear_layers_all_probes_each_stage(trained_checkpoint, capsys):
    got = run_json(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits", "--protocol", "linear",
                   "--layers", "all", "--layer-dim", "512")
    stages = ["block1", "block2", "block3", "block4"]
    assert list(got["layer_dims"]) == stages and got["layer_dim"] == 512
    for stage in stages:
        assert 30 < got[f"linear_top1_{stage}"] <= 100  # digits' stages are linearly informative (chance 10%)
    assert 30 < got["linear_top1"] <= 100
    rc = main(["eval", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--protocol", "linear",
               "--layers", "conv9"])
    assert rc == 2 and "unknown layer(s) ['conv9'] of convnet; choose from block1" in capsys.readouterr().err
    rc = main(["eval", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--layers", "all"])
    assert rc == 2 and "use --protocol linear or all, not knn" in capsys.readouterr().err


# --- all protocols, transfer ---------------------------------------------------------------------


def test_eval_all_writes_every_protocol_in_one_json(trained_checkpoint, capsys):
    got = run_json(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits", "--protocol", "all",
                   "--episodes", "50", "--shots", "1")
    assert got["protocol"] == "all" and "skipped" not in got
    assert 20 < got["knn_top1"] <= 100 and 20 < got["linear_top1"] <= 100
    assert 0 < got["nmi"] <= 1 and 20 < got["fewshot_5way_1shot"] <= 100
    assert 10 < got["lowshot_map"] <= 100 and got["probe"] == "fast"
    assert "linear_top1_block1" not in got  # stages only with --layers


def test_eval_transfers_a_backbone_to_other_data_and_skips_what_it_cannot_run(tmp_path, capsys):
    source = tiny_npz(tmp_path)  # 4 classes of 16 px colour-and-bar images
    assert main(["train", "--method", "npid", "--data", source, "--test-data", source, "--backbone", "convnet",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "width=8", "batch_size=32", "progress=false"]) == 0
    capsys.readouterr()
    for split in ("train", "test"):  # the target: digits (10 classes, 32 px, resized to the checkpoint's 16)
        digits = load_data(f"digits:{split}")
        np.savez(tmp_path / f"digits_{split}.npz", images=digits.images.permute(0, 2, 3, 1).numpy(),
                 labels=digits.labels.numpy())
    got = run_json(capsys, "eval", "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--data",
                   tmp_path / "digits_train.npz", "--test-data", tmp_path / "digits_test.npz", "--protocol", "all",
                   "--episodes", "50")
    assert got["test_data"] == str(tmp_path / "digits_test.npz")
    assert 30 < got["knn_top1"] <= 100 and 30 < got["linear_top1"] <= 100  # chance is 10% on digits
    assert 20 < got["fewshot_5way_5shot"] <= 100
    # 3 test images per class cannot fill a 1-shot episode with 15 queries: --protocol all skips it, says why
    small = np.load(source)
    np.savez(tmp_path / "small.npz", images=small["images"][:12], labels=small["labels"][:12])
    got = run_json(capsys, "eval", "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--data", source,
                   "--test-data", tmp_path / "small.npz", "--protocol", "all", "--shots", "1")
    assert "knn_top1" in got and not any(k.startswith("fewshot_4way") for k in got)
    assert got["skipped"] == ["fewshot 1-shot: 4-way 1-shot episodes with 15 queries need 4 classes of at least "
                              "16 images; the data has 0; lower ways, shots or queries"]
    # 3 training images per class: --protocol all runs the low-shot SVMs with the shot values they allow
    got = run_json(capsys, "eval", "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--data", tmp_path / "small.npz",
                   "--test-data", source, "--protocol", "all", "--episodes", "20")
    assert 0 < got["lowshot_map_2shot"] <= 100 and "lowshot_map_4shot" not in got
    assert f"lowshot [4, 8, 16] shots: a class of {tmp_path / 'small.npz'} has fewer training images" in got["skipped"]
    rc = main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--data", source, "--test-data",
               str(tmp_path / "small.npz"), "--protocol", "fewshot"])
    assert rc == 2 and "few-shot on" in capsys.readouterr().err
