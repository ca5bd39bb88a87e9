"""Method behaviour: DeepCluster, ODC, UIC, IS, AND, and the trainer's rounds and resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import assert_resume_equals_uninterrupted, context, read_rows, run_cfg

from deepclust.backbones import Backbone
from deepclust.checkpoint import load_checkpoint
from deepclust.cluster import ClusteringError, class_weights
from deepclust.methods import METHODS, Batch
from deepclust.methods.anchor_neighbourhood import bank_entropy_and_nearest, select_anchors
from deepclust.methods.deepcluster import DeepCluster
from deepclust.methods.odc import ODC
from deepclust.methods.uic import UIC, split_empty_classes
from deepclust.train import train

# --- DeepCluster -----------------------------------------------------------------------------------------------

def test_deepcluster_reinitialises_classifier_and_its_momentum_every_epoch():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (64, 3, 16, 16), dtype=torch.uint8)
    method = DeepCluster(Backbone("convnet", 16, width=8), 64, DeepCluster.Config(k=8, pca_dim=16))
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    weights = []
    for epoch in range(3):
        order = method.before_epoch(context(method, images, epoch=epoch, seed=epoch, optimizer=opt))
        assert method.classifier not in opt.state and all(p not in opt.state for p in method.classifier.parameters())
        weights.append(method.classifier.weight.detach().clone())
        assert sorted(torch.bincount(method.assignments[order], minlength=8).tolist())[0] >= 64 // 8
        batch = Batch([torch.randn(16, 3, 16, 16)], order[:16])
        loss, _ = method.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert any(p in opt.state for p in method.classifier.parameters())
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_deepcluster_logs_nmi_and_cluster_sizes(tmp_path):
    cfg, hp = run_cfg(tmp_path, "deepcluster", k=8)
    train(cfg, hp)
    rows = read_rows(tmp_path / "run")
    assert "nmi_prev" not in rows[0] and 0 <= rows[1]["nmi_prev"] <= 1
    for row in rows:
        assert 0 <= row["nmi_labels"] <= 1
        assert row["cluster_size_empty"] == 0 and row["cluster_size_min"] >= 1
        assert row["cluster_size_max"] >= row["cluster_size_median"] >= row["cluster_size_min"]
        assert row["cluster_time"] > 0


@pytest.mark.parametrize("method", ["deepcluster", "odc", "uic"])
def test_cluster_count_is_chosen_from_n_when_unset_and_recorded(tmp_path, method, caplog):
    cfg, hp = run_cfg(tmp_path, method, epochs=1, stop_after=1)
    assert hp.k is None  # the YAML leaves it to the data
    with caplog.at_level("INFO"):
        train(cfg, hp)
    assert hp.k == 2  # 96 samples: 96 // 50 = 1, raised to the minimum of 2
    assert f"{method}: k = 2 clusters for 96 samples" in caplog.text
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["k"] == 2


def test_deepcluster_head_keeps_the_full_lr_while_the_backbone_decays(tmp_path):
    cfg, hp = run_cfg(tmp_path, "deepcluster", k=8, lr_decay_at=[0.5])
    train(cfg, hp)
    groups = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]["param_groups"]
    assert [(g["scheduled"], g["lr"]) for g in groups] == [(True, pytest.approx(0.003)), (False, 0.03)]
    head = DeepCluster(Backbone("convnet", 32, 128, False, 8), 96, DeepCluster.Config(k=8))
    fixed = head.param_groups()[1]["params"]
    assert [p.shape for p in fixed] == [p.shape for p in head.classifier.parameters()]
    assert sum(p.numel() for g in head.param_groups() for p in g["params"]) == sum(
        p.numel() for p in head.parameters())


def test_deepcluster_k_above_sample_count_is_a_clear_error(tmp_path):
    cfg, hp = run_cfg(tmp_path, "deepcluster", k=500)
    with pytest.raises(ClusteringError, match="k = 500 clusters but only 96 samples"):
        train(cfg, hp)


def test_deepcluster_with_fewer_samples_than_pca_dims_falls_back(tmp_path, caplog):
    cfg, hp = run_cfg(tmp_path, "deepcluster", k=4, subset=20, epochs=1, sobel=True)
    train(cfg, hp)
    assert "PCA to 19 dimensions instead of 256" in caplog.text
    assert read_rows(tmp_path / "run")[0]["cluster_size_empty"] == 0


# --- ODC -------------------------------------------------------------------------------------------------------

def small_odc(n=40, k=4, interval=10, min_cluster=0, dim=2):
    backbone = Backbone("convnet", 16, width=8)
    cfg = ODC.Config(k=k, centroid_interval=interval, min_cluster=min_cluster, neck_dim=dim, neck_hidden=8)
    return ODC(backbone, n, cfg)


def test_odc_class_weights_are_inverse_sqrt_of_sizes():
    w = class_weights(torch.tensor([0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]), 4)
    raw = torch.tensor([1 / 2, 1.0, 1 / 3, 0.0])
    assert torch.allclose(w, raw / raw.sum())


def test_odc_step_updates_memory_with_momentum_and_relabels_to_nearest_centroid():
    m = small_odc(n=4, k=2, interval=100)
    m.memory.features.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]]))
    m.labels.copy_(torch.tensor([0, 1, 0, 1]))
    m.centroids.copy_(torch.tensor([[1.0, 0], [0, 1]]))
    # Sample 0 is pulled towards (0, 1): (0.5 * (1, 0) + 0.5 * (0, 1)) normalised, then a bit more.
    neck = torch.tensor([[0.0, 3.0], [0.0, 1.0]])  # normalised inside: (0, 1) twice
    m.after_step(Batch([], torch.tensor([0, 1])), {"neck": neck})
    expected0 = F.normalize(torch.tensor([0.5, 0.5]), dim=0)
    assert torch.allclose(m.memory.features[0], expected0)
    assert torch.allclose(m.memory.features[1], torch.tensor([0.0, 1.0]))
    # (0.707, 0.707) is equidistant; ties go to the first centroid: stays 0. Push it once more.
    m.after_step(Batch([], torch.tensor([0])), {"neck": torch.tensor([[0.0, 1.0]])})
    mixed = F.normalize(0.5 * expected0 + 0.5 * torch.tensor([0.0, 1.0]), dim=0)
    assert torch.allclose(m.memory.features[0], mixed)
    assert m.labels.tolist() == [1, 1, 0, 1]
    assert m.touched.tolist() == [True, True]
    assert m.change_steps == 2 and float(m.change_sum) == 1.0  # label changes 0.0, then 1.0


def test_odc_clean_memory_update_uses_the_unaugmented_image_in_eval_mode():
    torch.manual_seed(0)
    m = ODC(Backbone("convnet", 16, width=8), 8, ODC.Config(k=2, neck_hidden=8, neck_dim=4, memory_update="clean"))
    assert m.clean_view
    m.labels.copy_(torch.arange(8) % 2)
    m.train()
    augmented, clean = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    _, outputs = m.loss(Batch([augmented], torch.arange(4), clean))
    m.eval()
    with torch.no_grad():
        expected = m.neck(m.backbone.features(clean))
        assert torch.allclose(outputs["neck"], expected, atol=1e-6)  # eval mode: dropout off, running BN
        assert not torch.allclose(outputs["neck"], m.neck(m.backbone.features(augmented)))
    m.train()
    m.loss(Batch([augmented], torch.arange(4), clean))
    assert m.training and m.neck.training and m.backbone.training  # the eval-mode pass restores train mode


def test_odc_clean_memory_update_trains_end_to_end(tmp_path):
    """The trainer passes each batch un-augmented (Batch.clean) when the method asks; ODC's memory stays unit-norm."""
    cfg, hp = run_cfg(tmp_path, "odc", k=4, min_cluster=2, epochs=1, memory_update="clean")
    row = train(cfg, hp)
    assert math.isfinite(row["loss"]) and 0.0 <= row["label_change"] <= 1.0
    bank = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state"]["memory.features"]
    assert torch.allclose(bank.float().norm(dim=1), torch.ones(bank.shape[0]), atol=1e-3)


def test_odc_recomputes_touched_centroids_every_interval():
    m = small_odc(n=6, k=3, interval=2)
    feats = F.normalize(torch.tensor([[1.0, 0], [1, 0.2], [0, 1], [0.2, 1], [-1, 0], [-1, -0.2]]), dim=1)
    m.memory.features.copy_(feats)
    m.labels.copy_(torch.tensor([0, 0, 1, 1, 2, 2]))
    m.centroids.copy_(torch.tensor([[5.0, 0], [0, 5], [-5, 0]]))  # stale values, to see what gets recomputed
    m.memory.momentum = 0.0  # keep memory rows fixed so the expected means are exact
    m.after_step(Batch([], torch.tensor([0])), {"neck": feats[:1]})
    assert torch.equal(m.centroids, torch.tensor([[5.0, 0], [0, 5], [-5, 0]]))  # step 1: not yet
    m.after_step(Batch([], torch.tensor([2])), {"neck": feats[2:3]})  # step 2: recompute touched 0 and 1
    assert torch.allclose(m.centroids[0], feats[:2].mean(0))
    assert torch.allclose(m.centroids[1], feats[2:4].mean(0))
    assert torch.equal(m.centroids[2], torch.tensor([-5.0, 0]))  # untouched
    assert not m.touched.any()


def test_odc_small_clusters_are_dissolved_and_refilled():
    torch.manual_seed(0)
    n, k, threshold = 200, 8, 5
    m = small_odc(n=n, k=k, min_cluster=threshold, dim=4)
    feats = F.normalize(torch.randn(n, 4), dim=1)
    m.memory.features.copy_(feats)
    labels = torch.randint(0, 4, (n,))  # only 4 of 8 clusters used
    labels[:3] = 4  # a small one (3 members)
    labels[3:9] = 5  # a normal one (6 members)
    m.labels.copy_(labels)
    m.update_centroids(torch.ones(k, dtype=torch.bool))
    m.deal_with_small_clusters(seed=1)
    counts = torch.bincount(m.labels, minlength=k)
    assert counts.min() > threshold
    assert set(m.labels.tolist()) == set(range(k))
    assert counts.sum() == n
    assert torch.equal(m.labels[3:9], torch.full((6,), 5)) or counts[5] > threshold


def test_odc_warns_and_lowers_min_cluster_on_small_data(caplog):
    m = small_odc(n=100, k=10, min_cluster=20)
    assert m.min_cluster < 100 / 10 / 2
    assert "min_cluster 20 is too large" in caplog.text


def test_odc_resume_restores_both_memories_exactly(tmp_path):
    cfg, hp = run_cfg(tmp_path, "odc", k=6, min_cluster=2, name="full")
    train(cfg, hp)
    cfg, hp = run_cfg(tmp_path, "odc", k=6, min_cluster=2, name="cut", stop_after=1)
    train(cfg, hp)
    cfg, hp = run_cfg(tmp_path, "odc", k=6, min_cluster=2, name="cut")
    train(cfg, hp, resume=True)
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["state"]
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["state"]
    for key in ("memory.features", "labels", "centroids", "weights", "step", "classifier.weight"):
        assert torch.equal(full[key], cut[key]), key
    rows_full, rows_cut = read_rows(tmp_path / "full"), read_rows(tmp_path / "cut")
    for a, b in zip(rows_full, rows_cut, strict=True):
        assert a["loss"] == b["loss"] and a["label_change"] == b["label_change"] and a["knn_top1"] == b["knn_top1"]


def test_odc_logs_label_change_and_never_ends_an_epoch_with_a_small_cluster(tmp_path):
    cfg, hp = run_cfg(tmp_path, "odc", k=6, min_cluster=3)
    train(cfg, hp)
    for row in read_rows(tmp_path / "run"):
        assert 0 <= row["label_change"] <= 1 and 0 <= row["batch_label_change"] <= 1
        assert row["cluster_size_min"] > 3 and row["cluster_size_empty"] == 0
        assert "nmi_labels" in row


def test_odc_can_start_from_another_methods_checkpoint(tmp_path):
    cfg, hp = run_cfg(tmp_path, "npid", name="pre", epochs=1)
    train(cfg, hp)
    pre = load_checkpoint(tmp_path / "pre" / "checkpoint.pt")["state"]
    cfg, hp = run_cfg(tmp_path, "odc", k=6, min_cluster=2, name="ft", epochs=1, init=str(tmp_path / "pre" /
                                                                                             "checkpoint.pt"),
                      lr=1e-12, weight_decay=0.0, momentum=0.0)  # lr must be above 0: a step far below rounding
    train(cfg, hp)
    ft = load_checkpoint(tmp_path / "ft" / "checkpoint.pt")["state"]
    # lr ~ 0: the conv weights are the NPID ones (BN running stats move, weights do not).
    torch.testing.assert_close(ft["backbone.trunk.0.weight"], pre["backbone.trunk.0.weight"], rtol=0, atol=1e-9)


# --- UIC -------------------------------------------------------------------------------------------------------

def test_uic_split_empty_classes_gives_half_of_the_largest():
    labels = torch.tensor([0] * 10 + [1] * 4)
    out = split_empty_classes(labels, 4, torch.Generator().manual_seed(0))
    # class 2 takes 5 of class 0's 10; then class 0 and 2 tie at 5, argmax takes class 0: 2 of its 5 move.
    assert torch.bincount(out, minlength=4).tolist() == [3, 4, 5, 2]
    assert torch.equal(out[10:], labels[10:])


def test_uic_sampler_is_class_balanced_and_labels_flow_to_next_epoch():
    torch.manual_seed(0)
    n, k = 60, 4
    images = torch.randint(0, 255, (n, 3, 16, 16), dtype=torch.uint8)
    method = UIC(Backbone("convnet", 16, width=8), n, UIC.Config(k=k))
    order = method.before_epoch(context(method, images, epoch=0))
    counts = torch.bincount(method.targets[order], minlength=k)
    assert counts.max() - counts.min() <= 1
    targets_before = method.targets.clone()
    index = order[:8]
    batch = Batch([torch.randn(8, 3, 16, 16)], index)
    _, out = method.loss(batch)
    method.after_step(batch, out)
    assert torch.equal(method.targets, targets_before)  # this epoch's targets are untouched
    assert torch.equal(method.next_targets[index], out["logits"].argmax(1))
    written = method.next_targets.clone()
    method.before_epoch(context(method, images, epoch=1))
    if (torch.bincount(written, minlength=k) > 0).all():
        assert torch.equal(method.targets, written)  # labels written in epoch t are epoch t+1's targets


@pytest.mark.parametrize("workers", [0, 2])
def test_uic_labels_identical_with_and_without_loader_workers(tmp_path, workers):
    cfg, hp = run_cfg(tmp_path, "uic", k=5, name=f"w{workers}", num_workers=workers)
    train(cfg, hp)
    state = load_checkpoint(tmp_path / f"w{workers}" / "checkpoint.pt")["state"]
    reference_path = tmp_path.parent / "uic_reference.pt"
    if workers == 0:
        torch.save({"next": state["next_targets"]}, reference_path)
    else:
        reference = torch.load(reference_path, weights_only=True)
        assert torch.equal(reference["next"], state["next_targets"])


def test_uic_fft_fixes_labels_from_centre_crops(tmp_path):
    cfg, hp = run_cfg(tmp_path, "uic", k=5, epochs=3, fft_epochs=1)
    train(cfg, hp)
    rows = read_rows(tmp_path / "run")
    assert [r["fft"] for r in rows] == [0, 0, 1]
    assert all(r["class_size_empty"] == 0 for r in rows)


def test_uic_first_labels_come_from_the_runs_seed_and_leave_the_global_draws_alone():
    def start(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)  # as the trainer does before building the method
        method = UIC(Backbone("convnet", 16, width=8), 500, UIC.Config(k=10))
        return method.targets.clone(), torch.rand(3)  # the next global draw after building it

    (a, after_a), (b, _), (c, after_c) = start(1), start(2), start(1)
    assert torch.equal(a, c) and torch.equal(after_a, after_c)
    assert (a != b).float().mean() > 0.5  # another seed, another start
    assert torch.equal(a, torch.randint(10, (500,), generator=torch.Generator().manual_seed(1)))


def test_uic_resume_restores_labels(tmp_path):
    cfg, hp = run_cfg(tmp_path, "uic", k=5, name="full")
    train(cfg, hp)
    cfg, hp = run_cfg(tmp_path, "uic", k=5, name="cut", stop_after=1)
    train(cfg, hp)
    cfg, hp = run_cfg(tmp_path, "uic", k=5, name="cut")
    train(cfg, hp, resume=True)
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["state"]
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["state"]
    assert torch.equal(full["targets"], cut["targets"]) and torch.equal(full["next_targets"], cut["next_targets"])


# --- IS and AND ------------------------------------------------------------------------------------------------

def test_is_forwards_two_views_and_learns(tmp_path):
    assert METHODS["is"].views == 2
    cfg, hp = run_cfg(tmp_path, "is", epochs=3)
    train(cfg, hp)
    rows = read_rows(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_and_anchor_selection_picks_lowest_entropy():
    torch.manual_seed(0)
    base = F.normalize(torch.randn(10, 16), dim=1)
    twins = F.normalize(base[:4] + 0.01 * torch.randn(4, 16), dim=1)  # rows 10..13: near copies of 0..3
    bank = torch.cat((base, twins))
    ent, nearest = bank_entropy_and_nearest(bank, tau=0.05, chunk=5)
    # Against a direct computation.
    logits = bank @ bank.t() / 0.05
    logits.fill_diagonal_(float("-inf"))
    p = logits.softmax(1)
    direct = -(p * p.clamp_min(1e-30).log()).sum(1)
    assert torch.allclose(ent, direct, atol=1e-4)
    anchors = select_anchors(ent, 8 / 14)
    assert set(anchors.tolist()) == {0, 1, 2, 3, 10, 11, 12, 13}
    assert nearest[anchors].tolist() == [{0: 10, 1: 11, 2: 12, 3: 13, 10: 0, 11: 1, 12: 2, 13: 3}[a]
                                         for a in anchors.tolist()]
    assert torch.all(ent[anchors].max() <= ent[torch.tensor([4, 5, 6, 7, 8, 9])].min())


def test_and_round_zero_is_npid_and_anchors_grow_per_round(tmp_path):
    cfg, hp = run_cfg(tmp_path, "and", epochs=2, rounds=3, anchor_step=0.25, lr_decay_at=[0.5])
    train(cfg, hp)
    rows = read_rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert [r["anchors"] for r in rows] == [0, 0, 24, 24, 48, 48]  # 25% and 50% of 96
    lr = cfg.lr
    assert [r["lr"] for r in rows] == pytest.approx([lr, lr * 0.1] * 3)  # the schedule restarts each round
    assert all(0 <= r["neighbour_precision"] <= 1 for r in rows[2:])


def test_and_resume_mid_round_two_equals_uninterrupted(tmp_path):
    keys = {"epochs": 2, "rounds": 2, "lr_decay_at": [0.5], "eval_every": 1}
    assert_resume_equals_uninterrupted(tmp_path, "and", stop_after=3, **keys)  # round 1, epoch 1
