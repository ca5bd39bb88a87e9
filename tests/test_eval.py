"""Evaluation protocols: weighted kNN, Hungarian accuracy, clustering metrics, linear probe, feature passes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_npz

from deepclust.augment import test_transform as plain_transform
from deepclust.backbones import Backbone
from deepclust.cli import main
from deepclust.eval import (
    cluster_metrics,
    extract_features,
    hungarian_accuracy,
    knn_accuracy,
    knn_predict,
    linear_probe,
    nmi,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("k, tau", [(200, 0.1), (7, 0.1), (15, 0.5)])
def test_knn_accuracy_matches_sklearn_reference(sklearn_knn, k, tau):
    # weakly informative random features: accuracy is neither 0 nor 100, so mistakes would show
    train_labels = torch.randint(0, 5, (300,), generator=gen(0))
    test_labels = torch.randint(0, 5, (120,), generator=gen(1))
    centres = torch.randn(5, 16, generator=gen(2))
    train = F.normalize(centres[train_labels] * 0.4 + torch.randn(300, 16, generator=gen(3)), dim=1)
    test = F.normalize(centres[test_labels] * 0.4 + torch.randn(120, 16, generator=gen(4)), dim=1)
    ours = knn_accuracy(test, test_labels, train, train_labels, k=k, tau=tau)
    pred = sklearn_knn(train.numpy(), train_labels.numpy(), test.numpy(), k=k, tau=tau)
    reference = 100.0 * int((torch.from_numpy(pred) == test_labels).sum()) / len(test_labels)
    assert 20 < reference < 100
    assert ours == pytest.approx(reference, abs=1e-9)


def test_knn_predict_scores_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(test, train, labels, num_classes=3, k=2, tau=0.5)
    expected = torch.tensor([[math.exp(1.0 / 0.5), math.exp(0.6 / 0.5), 0.0]])  # neighbours 0 and 2
    torch.testing.assert_close(scores, expected)
    # k larger than the training set: capped at N - 1 = 2 (here also the smallest class's 1 x 2 classes)
    scores = knn_predict(test, train, labels, num_classes=2, k=50, tau=1.0)
    expected = torch.tensor([[math.exp(1.0), math.exp(0.6)]])  # neighbours 0 and 2, as with k = 2
    torch.testing.assert_close(scores, expected)


def test_knn_predict_chunking_is_invisible():
    train = F.normalize(torch.randn(50, 8, generator=gen(5)), dim=1)
    test = F.normalize(torch.randn(23, 8, generator=gen(6)), dim=1)
    labels = torch.randint(0, 4, (50,), generator=gen(7))
    torch.testing.assert_close(knn_predict(test, train, labels, 4, k=10, chunk=4),
                               knn_predict(test, train, labels, 4, k=10, chunk=1024))


def test_hungarian_accuracy_permuted_labelling_is_100():
    truth = torch.randint(0, 6, (200,), generator=gen(0))
    perm = torch.tensor([3, 5, 0, 1, 4, 2])
    assert hungarian_accuracy(perm[truth], truth) == pytest.approx(100.0)
    assert nmi(perm[truth], truth) == pytest.approx(1.0)


def test_hungarian_accuracy_by_hand():
    assert hungarian_accuracy(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 1, 0, 0, 1])) == pytest.approx(80.0)
    # more clusters than classes: only one cluster per class counts
    assert hungarian_accuracy([0, 1, 2, 2], [0, 0, 1, 1]) == pytest.approx(75.0)


def test_cluster_metrics_on_separable_data():
    labels = torch.arange(4).repeat_interleave(40)
    centres = F.normalize(torch.randn(4, 12, generator=gen(1)), dim=1) * 5
    feats = F.normalize(centres[labels] + 0.2 * torch.randn(160, 12, generator=gen(2)), dim=1)
    result = cluster_metrics(feats, labels)
    assert set(result) == {"nmi", "ari", "acc"}
    assert result["nmi"] > 0.99 and result["ari"] > 0.99 and result["acc"] > 99.0


def test_cluster_metrics_on_noise_is_low():
    labels = torch.arange(4).repeat_interleave(40)
    feats = F.normalize(torch.randn(160, 12, generator=gen(3)), dim=1)
    result = cluster_metrics(feats, labels)
    assert result["nmi"] < 0.2 and result["acc"] < 50.0


def test_linear_probe_on_separable_features():
    # three Gaussian classes whose means lie 6 standard deviations apart along random directions
    centres = F.normalize(torch.randn(3, 20, generator=gen(0)), dim=1) * 6
    ytr = torch.arange(3).repeat_interleave(100)
    yte = torch.arange(3).repeat_interleave(40)
    xtr = centres[ytr] + torch.randn(300, 20, generator=gen(1)) + 2
    xte = centres[yte] + torch.randn(120, 20, generator=gen(2)) + 2
    assert linear_probe(xtr, ytr, xte, yte) > 95.0
    # random labels cannot be learned for unseen data
    assert linear_probe(xtr, torch.randint(0, 3, (300,), generator=gen(3)), xte,
                        torch.randint(0, 3, (120,), generator=gen(4))) < 60.0


def test_extract_features_modes_shapes_and_values():
    torch.manual_seed(0)
    model = Backbone("convnet", image_size=16, width=4)
    model.train()
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8, generator=gen(5))
    emb = extract_features(model, images, "embedding", batch_size=3)
    pooled = extract_features(model, images, "pooled", batch_size=3, normalize=False)
    assert model.training  # mode restored
    assert emb.shape == (7, 128) and emb.dtype == torch.float32
    assert pooled.shape == (7, model.feat_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(7))
    model.eval()
    with torch.no_grad():
        x = plain_transform(images, 16)
        torch.testing.assert_close(emb, model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, model.features(x), atol=1e-5, rtol=1e-5)
    normed = extract_features(model, images, "pooled")
    torch.testing.assert_close(normed, F.normalize(pooled, dim=1), atol=1e-5, rtol=1e-5)
    assert extract_features(model, images, "embedding", image_size=8).shape == (7, 128)
    with pytest.raises(ValueError, match="embedding"):
        extract_features(model, images, "logits")


def test_knn_k_beyond_what_the_data_allows_is_capped_and_said_once(sklearn_knn, caplog, monkeypatch):
    from deepclust.eval import knn as knn_module

    monkeypatch.setattr(knn_module, "_clamps_logged", set())
    # 9 training images, 5 of class 0 (angles 0-40 degrees) and 4 of class 1 (70-100); tests near class 1.
    # tau = 10 makes the votes nearly equal: with all 9 voting the larger class wins by its size alone.
    angles = torch.tensor([0.0, 10, 20, 30, 40, 70, 80, 90, 100]) * math.pi / 180
    train = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    test_angles = torch.tensor([75.0, 85, 95]) * math.pi / 180
    test = torch.stack([test_angles.cos(), test_angles.sin()], 1)
    test_labels = torch.ones(3, dtype=torch.long)
    with caplog.at_level("WARNING", logger="deepclust.eval.knn"):
        scores = knn_predict(test, train, labels, num_classes=2, k=200, tau=10.0)
        accuracy = knn_accuracy(test, test_labels, train, labels, k=200, tau=10.0)
    # by hand, k = N - 1 = 8: every training image but the farthest (angle 0, class 0) votes exp(cos / tau)
    sims = test @ train.t()
    keep = sims.argsort(1, descending=True)[:, :8]
    want = torch.zeros(3, 2)
    for row in range(3):
        for j in keep[row].tolist():
            want[row, labels[j]] += math.exp(float(sims[row, j]) / 10.0)
    torch.testing.assert_close(scores, want)
    reference = sklearn_knn(train.numpy(), labels.numpy(), test.numpy(), k=8, tau=10.0)
    assert accuracy == 100.0 * float((reference == 1).mean()) == 100.0
    uncapped = sklearn_knn(train.numpy(), labels.numpy(), test.numpy(), k=9, tau=10.0)
    assert (uncapped == 0).all()  # what k >= N measured: 0%, below chance
    assert caplog.text.count("using k = 8") == 1  # said once, not at every evaluation
    # an imbalanced set: at most the smallest class's size times the class count (2 x 2), not N - 1 = 7
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    train = F.normalize(torch.randn(8, 4, generator=gen(8)), dim=1)
    test = F.normalize(torch.randn(6, 4, generator=gen(9)), dim=1)
    torch.testing.assert_close(knn_predict(test, train, labels, 2, k=200), knn_predict(test, train, labels, 2, k=4))
    assert knn_module.usable_k(200, labels) == 4 and knn_module.usable_k(3, labels) == 3


def test_eval_reports_the_k_it_used(trained_checkpoint, tmp_path, capsys):
    data = tiny_npz(tmp_path)  # 96 images, 4 classes of 24: k = 200 is capped at 95
    assert main(["eval", "--checkpoint", str(trained_checkpoint), "--data", data, "--test-data", data, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["k"] == 95 and 0 <= result["knn_top1"] <= 100
    assert main(["eval", "--checkpoint", str(trained_checkpoint), "--data", data, "--k", "0"]) == 2
    assert "--k must be at least 1" in capsys.readouterr().err
