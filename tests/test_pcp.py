"""PCP: the N_t schedule, CP_r, CP_s, singleton clusters, the loss, the warm-up and resume mid-vote."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_resume_equals_uninterrupted, context, read_rows, run_cfg

from deepclust.backbones import Backbone
from deepclust.cluster import ClusteringError, kmeans
from deepclust.cluster.purify import (
    cluster_anchors,
    group_purity,
    nearest_fraction,
    progressive_cluster_count,
    purify,
    squared_distances,
    vote_scores,
)
from deepclust.losses import label_positives
from deepclust.methods import Batch
from deepclust.methods.pcp import PCP
from deepclust.train import train

# --- the N_t schedule -------------------------------------------------------------------------------------------


def test_cluster_count_falls_log_linearly_to_the_floor():
    # lg N_t = (1 - t/4) lg 10^4: 10^4, 10^3, 10^2, 10^1, floored at 50 in the last epoch.
    assert [progressive_cluster_count(t, 4, 10_000, 50) for t in range(4)] == [10_000, 1000, 100, 50]
    assert [progressive_cluster_count(t, 4, 10_000, 5) for t in range(4)] == [10_000, 1000, 100, 10]
    # CIFAR-10: 50,000 clusters at epoch 0; the floor of 1,000 is first reached at epoch 73 of 200.
    counts = [progressive_cluster_count(t, 200, 50_000, 1000) for t in range(200)]
    assert counts[0] == 50_000 and counts[72] == int(50_000 ** (1 - 72 / 200)) > 1000 and counts[73] == 1000
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False)) and set(counts[73:]) == {1000}
    for t in (10, 40, 70):
        assert math.log10(counts[t]) == pytest.approx((1 - t / 200) * math.log10(50_000), abs=1e-3)


def test_floor_defaults_to_fifty_samples_a_cluster_and_is_logged(caplog):
    caplog.set_level(logging.INFO)
    backbone = Backbone("convnet", 16, width=8)
    assert PCP(backbone, 50_000, PCP.Config()).floor == 1000  # the paper's CIFAR-10 floor
    assert PCP(backbone, 1438, PCP.Config()).floor == 28  # digits: clusters of ~51, not the 1.4 of 1000
    assert "pcp: k = 28 clusters for 1438 samples" in caplog.text
    assert PCP(backbone, 1438, PCP.Config(min_clusters=10)).floor == 10  # e.g. the true class count
    with pytest.raises(ClusteringError, match="pcp: k = 2000 clusters but only 1438 samples"):
        PCP(backbone, 1438, PCP.Config(min_clusters=2000))


def test_bad_hyperparameters_are_clear_errors():
    with pytest.raises(ValueError, match="0 < gamma <= 1"):
        PCP(Backbone("convnet", 16, width=8), 100, PCP.Config(gamma=1.5))


# --- CP_r and CP_s ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_cpr_keeps_exactly_the_nearest_fraction_of_each_cluster(fraction):
    torch.manual_seed(0)
    x = F.normalize(torch.randn(300, 8), dim=1)
    result = kmeans(x, 12, iters=5, seed=1)
    dist = squared_distances(x, result.assignments, result.centroids)
    kept = nearest_fraction(result.assignments, dist, 12, fraction)
    for c in range(12):
        members = torch.nonzero(result.assignments == c).flatten()
        d = ((x[members] - x[members].mean(0)) ** 2).sum(1)  # centroids are the members' means
        want = set(members[torch.argsort(d)[: int(members.numel() * fraction)]].tolist())
        assert set(members[kept[members]].tolist()) == want, c
    anchors = cluster_anchors(result.assignments, dist, 12)
    for c in range(12):
        members = torch.nonzero(result.assignments == c).flatten()
        assert anchors[c] == members[dist[members].argmin()]


def test_cps_scores_equal_a_hand_computed_vote_history():
    current = torch.tensor([0, 0, 0, 1, 1])
    anchors = torch.tensor([0, 3])  # cluster 0's anchor is sample 0, cluster 1's is sample 3
    history = torch.tensor([[2, 2, 5, 7, 7],  # 1 epoch ago
                            [4, 9, 9, 1, 3],  # 2 epochs ago
                            [-1, -1, -1, -1, -1]])  # not recorded yet: no vote
    scores = vote_scores(current, history, anchors, alpha=0.5)
    # sample 1: now +1, 1 ago same as anchor 0 (+0.5), 2 ago not (-0.25); sample 2: +1 - 0.5 - 0.25.
    assert scores.tolist() == pytest.approx([1.75, 1.25, 0.25, 1.75, 1.25])
    # 15 epochs, always apart from the anchor / always with it: 1 -+ sum_{a=1..15} 0.8^a.
    apart = vote_scores(torch.tensor([0, 0]), torch.stack([torch.tensor([0, 1])] * 15), torch.tensor([0]), 0.8)
    together = vote_scores(torch.tensor([0, 0]), torch.zeros(15, 2, dtype=torch.long), torch.tensor([0]), 0.8)
    geometric = sum(0.8**a for a in range(1, 16))
    assert apart[1].item() == pytest.approx(1 - geometric) and together[1].item() == pytest.approx(1 + geometric)


def test_cps_drops_low_scoring_kept_members_and_pulls_back_high_scoring_filtered_ones():
    assignments = torch.zeros(6, dtype=torch.long)
    dist = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # CP_r at 0.5 keeps samples 0, 1, 2
    scores = torch.tensor([4.8, -0.1, 0.0, 3.0, 2.99, -3.0])
    p = purify(assignments, dist, 1, 0.5, scores, drop_below=0.0, pull_back_at=3.0)
    assert p.in_cluster.tolist() == [True, False, True, True, False, False]
    assert p.dropped == 1 and p.pulled_back == 1
    assert p.groups.tolist() == [0, 6 + 1, 0, 0, 6 + 4, 6 + 5]
    without_cps = purify(assignments, dist, 1, 0.5)
    assert without_cps.in_cluster.tolist() == [True, True, True, False, False, False]
    assert purify(assignments, dist, 1, None).in_cluster.all()  # cpr=false: the whole cluster


def test_singleton_clusters_stay_instances_and_later_clusters_are_still_purified():
    # Cluster 0 is a singleton, cluster 2 a pair (CP_r keeps 1 of it: alone), clusters 1 and 3 come after.
    assignments = torch.tensor([0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3])
    dist = torch.tensor([0.0, 0.4, 0.1, 0.3, 0.2, 0.1, 0.2, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    n = assignments.numel()
    p = purify(assignments, dist, 4, 0.5)
    assert torch.nonzero(p.in_cluster).flatten().tolist() == [2, 4, 10, 11, 12]  # nearest halves of 1 and 3
    assert p.groups[0] == n + 0 and p.groups[5] == n + 5 and p.groups[6] == n + 6  # instance classes
    positives = label_positives(torch.arange(n), p.groups)
    assert positives[0].nonzero().flatten().tolist() == [0]
    assert positives[2].nonzero().flatten().tolist() == [2, 4]
    assert positives[12].nonzero().flatten().tolist() == [10, 11, 12]
    # CP_s leaving a cluster with only its anchor makes that anchor an instance too; cluster 3 is unaffected.
    scores = torch.ones(n, dtype=torch.float64)
    scores[4] = -1.0
    p = purify(assignments, dist, 4, 0.5, scores)
    assert torch.nonzero(p.in_cluster).flatten().tolist() == [10, 11, 12] and p.groups[2] == n + 2


def test_group_purity_counts_majority_labels_of_kept_members():
    groups = torch.tensor([0, 0, 0, 1, 1, 9, 10])
    labels = torch.tensor([3, 3, 1, 2, 2, 0, 0])
    mask = torch.tensor([True, True, True, True, True, False, False])
    assert group_purity(groups, labels, mask) == pytest.approx(4 / 5)


# --- the loss and the warm-up -----------------------------------------------------------------------------------


def hand_pcp_loss(z1, z2, bank, groups, index, t, tau):
    """t * mean_i -log(sum_{j in G_i} e^{z_i m_j / tau} / sum_j e^{z_i m_j / tau}) + (1 - t) * IS, by loops."""
    z1, z2, bank = z1.double().tolist(), z2.double().tolist(), bank.double().tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    group = 0.0
    for row, i in enumerate(index):
        e = [math.exp(dot(z1[row], m) / tau) for m in bank]
        group -= math.log(sum(e[j] for j in range(len(bank)) if groups[j] == groups[i]) / sum(e))
    group /= len(index)
    z = z1 + z2
    b = len(z1)
    spread = 0.0
    for i in range(2 * b):
        partner = (i + b) % (2 * b)
        e = {j: math.exp(dot(z[i], z[j]) / tau) for j in range(2 * b) if j != i}
        d = sum(e.values())
        spread -= math.log(e[partner] / d) + sum(math.log(1 - e[j] / d) for j in e if j != partner)
    spread /= 2 * b
    return t * group + (1 - t) * spread


def test_pcp_loss_equals_a_hand_computed_value():
    torch.manual_seed(0)
    n = 6
    method = PCP(Backbone("convnet", 16, width=8), n, PCP.Config())
    method.bank.fill(torch.randn(n, 128))
    method.groups.copy_(torch.tensor([0, 0, n + 2, 1, 1, n + 5]))  # {0, 1}, {3, 4}; 2 and 5 are instances
    index = torch.tensor([0, 2, 3, 5])
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    method.t = 0.3
    loss, out = method.loss(Batch(views, index))
    with torch.no_grad():  # train-mode BN: the same batch gives the same features
        z1, z2 = method.backbone(torch.cat(views)).chunk(2)
    want = hand_pcp_loss(z1, z2, method.bank.features, method.groups.tolist(), index.tolist(), 0.3, 0.1)
    assert loss.item() == pytest.approx(want, rel=1e-4)
    assert torch.allclose(out["embedding"], z1)
    method.t = 1.0  # after the warm-up: one view, the PCP branch alone
    loss, _ = method.loss(Batch(views[:1], index))
    with torch.no_grad():
        z1 = method.backbone(views[0])
    assert loss.item() == pytest.approx(hand_pcp_loss(z1, z1, method.bank.features, method.groups.tolist(),
                                                      index.tolist(), 1.0, 0.1), rel=1e-4)


def test_warmup_weight_rises_then_the_is_branch_and_its_second_view_go():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (40, 3, 16, 16), dtype=torch.uint8)
    method = PCP(Backbone("convnet", 16, width=8), 40, PCP.Config(min_clusters=4))
    weights, views = [], []
    for round_, epoch in [(0, 0), (0, 4), (0, 8), (0, 9), (1, 0)]:
        method.before_epoch(context(method, images, epoch=epoch, round_=round_, epochs=10))
        weights.append(method.t)
        views.append(method.views)
    assert weights == pytest.approx([0.2, 0.2 + 0.3 * 4 / 9, 0.2 + 0.3 * 8 / 9, 1.0, 1.0])
    assert views == [2, 2, 2, 1, 1]
    off = PCP(Backbone("convnet", 16, width=8), 40, PCP.Config(min_clusters=4, warmup=False))
    off.before_epoch(context(off, images, epoch=0, epochs=10))
    assert off.t == 1.0 and off.views == 1


# --- training runs ----------------------------------------------------------------------------------------------


def test_ablation_flags_fixed_k_and_no_purification(tmp_path):
    cfg, hp = run_cfg(tmp_path, "pcp", epochs=3, min_clusters=6, progressive=False, cpr=False,
                      cps=False, warmup=False)
    train(cfg, hp)
    rows = read_rows(tmp_path / "run")
    assert [r["n_clusters"] for r in rows] == [6, 6, 6]
    assert all(r["voting"] == 0 and r["dropped"] == 0 and r["pulled_back"] == 0 for r in rows)
    assert all(r["pcp_weight"] == 1.0 and r["kept"] > 0.9 and 0 < r["kept_purity"] <= 1 for r in rows)


def test_resume_in_round_two_while_voting_equals_uninterrupted(tmp_path):
    keys = {"epochs": 4, "rounds": 2, "lr_decay_at": [0.5], "eval_every": 2, "min_clusters": 8,
            "vote_epochs": 3, "vote_start": 0.5}
    rows = assert_resume_equals_uninterrupted(tmp_path, "pcp", stop_after=6, **keys)  # round 1, epoch 2
    assert [r["n_clusters"] for r in rows[:4]] == [96, 30, 9, 8] and [r["n_clusters"] for r in rows[4:]] == [8] * 4
    assert [r["voting"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert [r["pcp_weight"] < 1 for r in rows] == [True] * 4 + [False] * 4
    assert all(0 <= r["kept"] <= 1 and r["dropped"] >= 0 and r["pulled_back"] >= 0 for r in rows)
