"""Memory bank, losses, k-means, PCA-whitening, the balanced sampler."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from deepclust.cluster import (
    ClusteringError,
    balanced_indices,
    centroid_sums,
    kmeans,
    nearest_centroid,
    pca_whiten,
    size_stats,
    split_empty_clusters,
)
from deepclust.losses import (
    entropy,
    gathered_group_loss,
    group_loss,
    instance_positives,
    invariant_spreading_loss,
    label_positives,
    neighbour_positives,
)
from deepclust.memory import MemoryBank


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- memory bank ---------------------------------------------------------------------------------


def test_memory_bank_initialised_normalised_and_in_state_dict():
    bank = MemoryBank(10, 4, seed=3)
    assert len(bank) == 10 and bank.features.shape == (10, 4)
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(10))
    assert "features" in bank.state_dict()
    assert torch.equal(MemoryBank(10, 4, seed=3).features, bank.features)
    assert not torch.equal(MemoryBank(10, 4, seed=4).features, bank.features)


def test_memory_bank_update_is_momentum_then_normalise():
    bank = MemoryBank(6, 3, momentum=0.5)
    before = bank.features.clone()
    index = torch.tensor([4, 1])
    f = F.normalize(torch.tensor([[1.0, 2.0, 2.0], [0.0, -3.0, 4.0]]), dim=1)
    bank.update(index, f)
    for row, i in enumerate(index.tolist()):
        mixed = 0.5 * before[i] + 0.5 * f[row]
        torch.testing.assert_close(bank.features[i], mixed / mixed.norm())
    untouched = [0, 2, 3, 5]
    assert torch.equal(bank.features[untouched], before[untouched])


def test_memory_bank_update_other_momentum_and_no_grad():
    bank = MemoryBank(4, 3, momentum=0.2)
    before = bank.features.clone()
    f = F.normalize(torch.randn(1, 3, requires_grad=True), dim=1)
    bank.update(torch.tensor([2]), f)
    mixed = 0.8 * before[2] + 0.2 * f[0].detach()
    torch.testing.assert_close(bank.features[2], mixed / mixed.norm())
    assert not bank.features.requires_grad


def test_memory_bank_fill_and_logits():
    bank = MemoryBank(3, 2)
    bank.fill(torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]]))
    torch.testing.assert_close(bank.features, torch.tensor([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]))
    logits = bank.logits(torch.tensor([[1.0, 0.0]]), tau=0.5)
    torch.testing.assert_close(logits, torch.tensor([[1.2, 0.0, -2.0]]))


# --- losses --------------------------------------------------------------------------------------


def test_group_loss_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.3, 3.0, 1.0]])
    positives = torch.tensor([[True, False, True, False], [False, True, True, True]])
    p = logits.softmax(1)
    expected = -(math.log(p[0, 0] + p[0, 2]) + math.log(p[1, 1] + p[1, 2] + p[1, 3])) / 2
    torch.testing.assert_close(group_loss(logits, positives), torch.tensor(expected))


def test_gathered_group_loss_equals_the_masked_one_with_its_gradient():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.3, 3.0, 1.0]], requires_grad=True)
    members = torch.tensor([[2, 0, -1], [3, 1, 2]])  # G_0 = {0, 2}, G_1 = {1, 2, 3}, as hand-computed above
    positives = torch.tensor([[True, False, True, False], [False, True, True, True]])
    gathered = gathered_group_loss(logits, members)
    gathered.backward()
    masked_logits = logits.detach().clone().requires_grad_(True)
    masked = group_loss(masked_logits, positives)
    masked.backward()
    torch.testing.assert_close(gathered, masked)
    torch.testing.assert_close(logits.grad, masked_logits.grad)


def test_group_loss_singleton_equals_cross_entropy():
    logits = torch.randn(5, 12, generator=gen(1))
    index = torch.tensor([3, 0, 11, 7, 3])
    loss = group_loss(logits, instance_positives(index, 12))
    torch.testing.assert_close(loss, F.cross_entropy(logits, index))


def test_group_loss_everything_positive_is_zero():
    logits = torch.randn(3, 5, generator=gen(2))
    loss = group_loss(logits, torch.ones(3, 5, dtype=torch.bool))
    assert abs(float(loss)) < 1e-6


def test_group_loss_gradient_matches_autograd_of_reference():
    logits = torch.randn(3, 6, generator=gen(3), requires_grad=True)
    positives = torch.zeros(3, 6, dtype=torch.bool)
    positives[0, [0, 1]] = positives[1, [4]] = positives[2, [2, 3, 5]] = True
    group_loss(logits, positives).backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    p = ref_logits.softmax(1)
    (-(p * positives).sum(1).log().mean()).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_instance_positives():
    mask = instance_positives(torch.tensor([2, 0]), 4)
    assert mask.tolist() == [[False, False, True, False], [True, False, False, False]]


def test_neighbour_positives():
    neighbours = torch.tensor([[1, -1], [0, 3], [-1, -1], [2, 1], [4, 4]])
    mask = neighbour_positives(torch.tensor([0, 2, 3, 1]), neighbours)
    assert mask.shape == (4, 5)
    assert mask.tolist() == [
        [True, True, False, False, False],  # 0 and its neighbour 1, padding ignored
        [False, False, True, False, False],  # no neighbours
        [False, True, True, True, False],  # 3 and its neighbours 2, 1
        [True, True, False, True, False],  # 1 and its neighbours 0, 3
    ]


def test_label_positives():
    groups = torch.tensor([0, 1, 0, 2, 1])
    mask = label_positives(torch.tensor([0, 3, 4]), groups)
    assert mask.tolist() == [
        [True, False, True, False, False],
        [False, False, False, True, False],
        [False, True, False, False, True],
    ]


def is_loss_loop(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """METHODS.md's IS loss written out, one row at a time: the other rows (denominator, positive) detached."""
    z = torch.cat((z1, z2))
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        partner = (i + b) % n
        e = {j: torch.exp(z[i] @ z[j].detach() / tau) for j in range(n) if j != i}
        d = sum(e.values())
        term = torch.log(e[partner] / d)
        for j in e:
            if j != partner:
                term = term + torch.log(1 - e[j] / d)
        total = total + term
    return -total / n


def test_invariant_spreading_loss_matches_loop():
    z1 = F.normalize(torch.randn(3, 4, generator=gen(5)), dim=1)
    z2 = F.normalize(z1 + 0.3 * torch.randn(3, 4, generator=gen(6)), dim=1)
    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    b1, b2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = invariant_spreading_loss(a1, a2, tau=0.5)
    ref = is_loss_loop(b1, b2, tau=0.5)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, b1.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a2.grad, b2.grad, atol=1e-5, rtol=1e-4)


def test_invariant_spreading_loss_prefers_aligned_views():
    z1 = F.normalize(torch.randn(4, 8, generator=gen(7)), dim=1)
    aligned = invariant_spreading_loss(z1, z1.clone(), tau=0.1)
    shuffled = invariant_spreading_loss(z1, z1[[1, 2, 3, 0]], tau=0.1)
    assert float(aligned) < float(shuffled)


def test_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(entropy(logits), torch.tensor([math.log(4), 0.0]), atol=1e-5, rtol=0)


# --- k-means -------------------------------------------------------------------------------------


def planted_clusters(k=5, per=60, d=32, spread=4.0, seed=0):
    g = gen(seed)
    means = torch.randn(k, d, generator=g) * spread
    x = means.repeat_interleave(per, 0) + torch.randn(k * per, d, generator=g)
    return x, torch.arange(k).repeat_interleave(per)


def test_nearest_centroid_matches_brute_force():
    x = torch.randn(50, 6, generator=gen(0), dtype=torch.float64)
    c = torch.randn(7, 6, generator=gen(1), dtype=torch.float64)
    labels, dist = nearest_centroid(x, c, chunk=9)
    full = torch.cdist(x, c) ** 2
    assert torch.equal(labels, full.argmin(1))
    torch.testing.assert_close(dist, full.min(1).values)


def test_kmeans_recovers_planted_clusters_after_pca_whitening():
    x, truth = planted_clusters()
    z = F.normalize(pca_whiten(x, 16), dim=1)
    result = kmeans(z, 5, iters=20, seed=0)
    assert result.centroids.shape == (5, 16)
    assert result.assignments.shape == (300,)
    assert normalized_mutual_info_score(truth.numpy(), result.assignments.numpy()) > 0.95
    manual = float(((z - result.centroids[result.assignments]) ** 2).sum())
    assert result.inertia == pytest.approx(manual, rel=1e-5)


def test_kmeans_stops_at_a_fixed_point_with_the_result_of_all_passes():
    x = torch.randn(300, 8, generator=gen(7))
    x[:100] += 6
    full = kmeans(x, 3, iters=50, seed=2)
    assert 2 <= full.passes < 50  # converged, then one pass that changed nothing
    again = kmeans(x, 3, iters=full.passes - 1, seed=2)  # the passes before the unchanged one
    assert torch.equal(again.assignments, full.assignments) and torch.equal(again.centroids, full.centroids)
    every_row = kmeans(x, 300, iters=20, seed=2)  # k = N (PCP's first epoch): each row its own cluster
    assert every_row.passes == 2 and every_row.inertia == 0.0
    assert torch.equal(torch.sort(every_row.assignments).values, torch.arange(300))


def test_kmeans_is_reproducible_by_seed():
    x, _ = planted_clusters(k=8, per=20, spread=1.0)
    a, b = kmeans(x, 8, seed=3), kmeans(x, 8, seed=3)
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.centroids, b.centroids)


def assert_no_empty_and_means(x: torch.Tensor, result, k: int):
    counts = torch.bincount(result.assignments, minlength=k)
    assert counts.numel() == k and (counts > 0).all(), counts
    for c in range(k):
        torch.testing.assert_close(result.centroids[c], x[result.assignments == c].mean(0))


def test_kmeans_duplicates_leave_no_empty_cluster():
    g = gen(0)
    x = torch.cat((torch.ones(40, 3), torch.randn(8, 3, generator=g) * 5))  # 40 copies of one point
    for k in (10, 30, 47, 48):  # up to k == N
        result = kmeans(x, k, iters=5, seed=1)
        assert_no_empty_and_means(x, result, k)


def test_kmeans_all_identical_points():
    x = torch.full((12, 4), 2.5)
    result = kmeans(x, 6, iters=3, seed=0)
    assert_no_empty_and_means(x, result, 6)
    assert result.inertia == pytest.approx(0.0, abs=1e-8)


def test_split_empty_clusters_directly():
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1]])
    centroids = torch.tensor([[0.1], [10.05], [50.0]])
    assignments = torch.tensor([0, 0, 0, 1, 1])
    new = split_empty_clusters(x, centroids, assignments, gen(0))
    counts = torch.bincount(new, minlength=3)
    assert (counts > 0).all()
    assert counts.sum() == 5
    assert new.tolist() != assignments.tolist()


@pytest.mark.parametrize("points", ["distinct", "identical"])
def test_split_empty_clusters_fills_thousands_in_few_rounds(points, monkeypatch):
    """k near N with all rows in 3 clusters: every empty cluster filled, rows only move into the formerly empty
    ones, the same result for the same seed, and the donors drawn in about log2(k) rounds (one torch.multinomial
    each; uneven halves of small clusters make it up to ~2 log2(k) for distinct points), where a loop per empty
    cluster draws ~2,000 times."""
    n, k = 2000, 1990
    x = torch.randn(n, 6, generator=gen(4)) if points == "distinct" else torch.ones(n, 6)
    assignments = torch.arange(n) % 3
    draws = []
    multinomial = torch.multinomial

    def counted(*args, **kwargs):
        draws.append(1)
        return multinomial(*args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", counted)
    results = [split_empty_clusters(x, torch.randn(k, 6, generator=gen(5)), assignments, gen(6)) for _ in range(2)]
    assert torch.equal(results[0], results[1])
    repaired = results[0]
    counts = torch.bincount(repaired, minlength=k)
    assert counts.numel() == k and int(counts.min()) >= 1 and int(counts.sum()) == n
    assert ((repaired == assignments) | (repaired >= 3)).all()  # members only move into the empty clusters
    assert len(draws) <= 2 * 3 * math.ceil(math.log2(k))  # both calls: at most 33 rounds each (18 measured)


def test_kmeans_more_clusters_than_samples():
    with pytest.raises(ClusteringError, match="k = 11 clusters but only 10 samples"):
        kmeans(torch.randn(10, 3), 11)
    with pytest.raises(ClusteringError):
        kmeans(torch.randn(10, 3), 0)


def test_centroid_sums_and_size_stats():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    sums, counts = centroid_sums(x, torch.tensor([0, 0, 2]), 3)
    torch.testing.assert_close(sums, torch.tensor([[4.0, 2.0], [0.0, 0.0], [5.0, 5.0]]))
    assert counts.tolist() == [2, 0, 1]
    stats = size_stats(torch.tensor([0, 0, 2, 2, 2]), 4)
    assert set(stats) == {"cluster_size_min", "cluster_size_median", "cluster_size_max", "cluster_size_empty"}
    assert stats["cluster_size_min"] == 0 and stats["cluster_size_max"] == 3 and stats["cluster_size_empty"] == 2


# --- PCA -----------------------------------------------------------------------------------------


def test_pca_whiten_identity_covariance():
    g = gen(0)
    mix = torch.randn(20, 20, generator=g)
    x = (torch.randn(500, 20, generator=g) * torch.linspace(0.5, 10, 20)) @ mix + 3.0
    y = pca_whiten(x, 8)
    assert y.shape == (500, 8) and y.dtype == x.dtype
    torch.testing.assert_close(y.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    cov = y.T.double() @ y.double() / (len(y) - 1)
    torch.testing.assert_close(cov, torch.eye(8, dtype=torch.float64), atol=1e-3, rtol=0)


def test_pca_whiten_keeps_top_components():
    g = gen(1)
    x = torch.zeros(400, 5)
    x[:, 2] = torch.randn(400, generator=g) * 10  # the dominant direction
    x[:, 0] = torch.randn(400, generator=g) * 0.1
    y = pca_whiten(x, 1)
    corr = torch.corrcoef(torch.stack((y[:, 0], x[:, 2])))[0, 1]
    assert abs(float(corr)) > 0.999


def test_pca_eps_whitens_directions_above_it_and_damps_those_below_and_says_how_many():
    g = gen(4)
    scales = torch.tensor([1.0, 0.5, 1e-3, 1e-4])  # variances 1, 0.25, 1e-6, 1e-8
    x = torch.randn(4000, 4, generator=g, dtype=torch.float64) * scales
    for eps, damped in ((1e-5, 0.5), (1e-12, 0.0)):
        stats: dict[str, float] = {}
        var = pca_whiten(x, 4, eps=eps, stats=stats).var(0)
        assert stats["pca_damped"] == damped
        sample = x.var(0)  # the axes are the principal axes (uncorrelated columns, variances 4 decades apart)
        torch.testing.assert_close(var, sample / (sample + eps), rtol=1e-3, atol=1e-9)
    # a dead channel (variance 0) is damped to 0, never NaN, at any eps
    x[:, 3] = 0.5
    assert torch.isfinite(pca_whiten(x, 4, eps=1e-12)).all()


def test_pca_whiten_caps_dims():
    x = torch.randn(5, 20, generator=gen(2))
    assert pca_whiten(x, 10).shape == (5, 4)  # N - 1
    assert pca_whiten(torch.randn(50, 6, generator=gen(3)), 256).shape == (50, 6)  # feature width
    assert pca_whiten(torch.randn(1, 6), 4).shape == (1, 1)


# --- balanced sampler ----------------------------------------------------------------------------


def test_balanced_indices_equal_per_class():
    labels = torch.tensor([0] * 50 + [1] * 3 + [3] * 10 + [5] * 1)  # classes 2 and 4 empty
    labels = labels[torch.randperm(len(labels), generator=gen(9))]
    picks = balanced_indices(labels, 101, gen(0))
    assert picks.shape == (101,) and picks.dtype == torch.long
    assert picks.min() >= 0 and picks.max() < len(labels)
    drawn = torch.bincount(labels[picks], minlength=6)
    assert drawn[2] == 0 and drawn[4] == 0
    nonempty = drawn[[0, 1, 3, 5]]
    assert nonempty.sum() == 101
    assert nonempty.max() - nonempty.min() <= 1
    # a big class is not repeated while it has unused members; a small one is cycled evenly
    big = picks[labels[picks] == 0]
    assert big.unique().numel() == big.numel()
    small = torch.bincount(picks[labels[picks] == 1], minlength=len(labels))
    small = small[small > 0]
    assert small.numel() == 3 and small.max() - small.min() <= 1


def test_balanced_indices_shuffled_and_reproducible():
    labels = torch.arange(4).repeat_interleave(25)
    a = balanced_indices(labels, 100, gen(1))
    b = balanced_indices(labels, 100, gen(1))
    c = balanced_indices(labels, 100, gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(labels[a], labels[a].sort().values)  # classes interleaved, not blocked
    assert sorted(a.tolist()) == list(range(100))  # equal classes: a permutation


def test_balanced_indices_fewer_draws_than_classes():
    labels = torch.arange(10)
    picks = balanced_indices(labels, 4, gen(0))
    assert picks.numel() == 4 and picks.unique().numel() == 4


def test_cluster_count_keeps_the_papers_cluster_size():
    from deepclust.cluster import cluster_count

    assert cluster_count(None, 50_000) == 1000  # CIFAR-10: the PCP paper's DeepCluster k
    assert cluster_count(None, 8_000) == 160
    assert cluster_count(None, 1_281_167) == 10_000  # ImageNet: DeepCluster's and ODC's k
    assert cluster_count(None, 60) == 2
    assert cluster_count(7, 60) == 7  # a k the user sets is kept
    with pytest.raises(ClusteringError, match="k = 70 clusters but only 60 samples"):
        cluster_count(70, 60)

def test_invariant_spreading_loss_stays_finite_under_bf16_autocast():
    """A partner probability of ~1 (small batch, sharp tau): in bf16 the clamp at 1 - 1e-6 rounds to 1 and
    log1p(-1) * 0 made the loss NaN (the medium profile's IS runs died at an epoch's last small batch)."""
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = invariant_spreading_loss(z, z.detach().clone(), 0.02)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.allclose(loss, invariant_spreading_loss(z, z.detach().clone(), 0.02))
    loss.backward()
    assert torch.isfinite(z.grad).all()
