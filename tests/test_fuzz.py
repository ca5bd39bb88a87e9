"""Property tests (hypothesis) of the clustering utilities on degenerate features (k-means, empty-cluster repair,
PCA-whitening, the kNN graph, ODC's small-cluster split, purification) and of the config parser."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepclust.cluster import ClusteringError, kmeans, knn_graph, pca_whiten, split_empty_clusters, split_in_two
from deepclust.cluster.purify import purify
from deepclust.config import ConfigError, TrainConfig, parse_overrides, resolve
from deepclust.methods import METHODS

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("random", "identical", "zeros", "duplicates", "one_hot", "huge", "tiny")


@st.composite
def features(draw, max_n: int = 40, max_d: int = 8, min_n: int = 1) -> torch.Tensor:
    """(n, d) float32 features, often degenerate: all rows equal, all zero, a few rows repeated, extreme scales."""
    n, d = draw(st.integers(min_n, max_n)), draw(st.integers(1, max_d))
    kind = draw(st.sampled_from(KINDS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, d, generator=gen)
    if kind == "identical":
        x = x[:1].expand(n, d).clone()
    elif kind == "zeros":
        x = torch.zeros(n, d)
    elif kind == "duplicates":
        x = x[torch.randint(0, draw(st.integers(1, min(3, n))), (n,), generator=gen)]
    elif kind == "one_hot":
        x = F.one_hot(torch.randint(0, d, (n,), generator=gen), d).float()
    elif kind == "huge":
        x = x * 1e15
    elif kind == "tiny":
        x = x * 1e-15
    return x


@FUZZ
@given(x=features(), k_frac=st.floats(0, 1), iters=st.integers(1, 5), seed=st.integers(0, 1000))
def test_kmeans_on_degenerate_features_never_crashes_and_leaves_no_cluster_empty(x, k_frac, iters, seed):
    n = x.shape[0]
    k = max(1, round(k_frac * n))
    result = kmeans(x, k, iters=iters, seed=seed)
    assert result.assignments.shape == (n,) and result.centroids.shape == (k, x.shape[1])
    counts = torch.bincount(result.assignments, minlength=k)
    assert counts.numel() == k and int(counts.min()) >= 1
    assert torch.isfinite(result.centroids).all() and result.inertia >= 0
    # the centroids are the means of their members
    means = torch.zeros_like(result.centroids).index_add_(0, result.assignments, x) / counts.unsqueeze(1)
    torch.testing.assert_close(result.centroids, means)


@FUZZ
@given(x=features(), k=st.integers(1, 50))
def test_kmeans_with_more_clusters_than_samples_is_a_clustering_error(x, k):
    if k > x.shape[0]:
        try:
            kmeans(x, k)
        except ClusteringError as err:
            assert f"only {x.shape[0]} samples" in str(err)
        else:
            raise AssertionError("no ClusteringError")


@FUZZ
@given(x=features(), data=st.data())
def test_empty_cluster_repair_fills_every_cluster(x, data):
    n, d = x.shape
    k = data.draw(st.integers(1, n))
    used = data.draw(st.integers(1, k))  # only the first `used` clusters have members
    assignments = torch.tensor(data.draw(st.lists(st.integers(0, used - 1), min_size=n, max_size=n)))
    centroids = torch.randn(k, d)
    was_empty = torch.bincount(assignments, minlength=k) == 0
    repaired = split_empty_clusters(x, centroids, assignments, torch.Generator().manual_seed(0))
    assert int(torch.bincount(repaired, minlength=k).min()) >= 1
    assert ((repaired == assignments) | was_empty[repaired]).all()  # members only move into the empty clusters


@FUZZ
@given(x=features(max_d=16), dim=st.integers(1, 20))
def test_pca_whitening_of_degenerate_features_is_finite(x, dim):
    n, d = x.shape
    y = pca_whiten(x, dim)
    assert y.shape == (n, min(dim, d, max(1, n - 1)))
    assert torch.isfinite(y).all()


@FUZZ
@given(x=features(min_n=2), data=st.data())
def test_knn_graph_of_degenerate_features_is_valid(x, data):
    n = x.shape[0]
    k = data.draw(st.integers(1, n - 1))
    sims, idx = knn_graph(F.normalize(x, dim=1), k)
    assert sims.shape == idx.shape == (n, k)
    assert ((idx >= 0) & (idx < n)).all() and (idx != torch.arange(n).unsqueeze(1)).all()
    assert torch.isfinite(sims).all()
    assert all(len(set(row)) == k for row in idx.tolist())  # k distinct neighbours


@FUZZ
@given(x=features(min_n=2), seed=st.integers(0, 1000), min_side=st.integers(0, 10))
def test_odc_small_cluster_split_gives_two_non_empty_halves_of_degenerate_features(x, seed, min_side):
    side = split_in_two(x, seed, min_side)
    assert side.dtype == torch.bool and side.shape == (x.shape[0],)
    assert 0 < int(side.sum()) < x.shape[0]


@FUZZ
@given(data=st.data())
def test_purification_keeps_groups_of_two_or_more_and_makes_the_rest_instances(data):
    n = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, n))
    assignments = torch.tensor(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    dist = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5]) | st.floats(0, 10), min_size=n,
                                           max_size=n)))  # many ties
    keep = data.draw(st.none() | st.floats(0, 1))
    scores = data.draw(st.none() | st.lists(st.floats(-5, 5), min_size=n, max_size=n))
    p = purify(assignments, dist, k, keep, None if scores is None else torch.tensor(scores, dtype=torch.float64))
    ids = torch.arange(n)
    assert torch.equal(p.groups[p.in_cluster], assignments[p.in_cluster])
    assert torch.equal(p.groups[~p.in_cluster], n + ids[~p.in_cluster])
    sizes = torch.bincount(p.groups[p.in_cluster], minlength=k)
    assert ((sizes == 0) | (sizes >= 2)).all()
    if keep is None and scores is None:  # nothing filtered: every member of a cluster of 2+ stays
        assert torch.equal(p.in_cluster, torch.bincount(assignments, minlength=k)[assignments] >= 2)


KEYS = sorted({*TrainConfig.__dataclass_fields__, *METHODS["deepcluster"].Config.__dataclass_fields__})
VALUES = st.one_of(st.text(max_size=12), st.sampled_from(["", "null", "1", "-1", "0", "1e999", "nan", ".inf", "true",
                                                          "[1, 2]", "[", "{a: 1}", "2020-01-01", "!!python/none",
                                                          "*alias", "&a 1", "'", '"', ": :", "- - x", "0x10",
                                                          "1_000", "1.5", "[0.5, x]", "~", "%", "@"]))


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=8), VALUES), max_size=4),
       raw=st.lists(st.text(max_size=10), max_size=2))
def test_random_key_value_strings_give_a_config_or_a_config_error(pairs, raw):
    argv = [f"{k}={v}" for k, v in pairs] + raw
    try:
        cfg, hparams = resolve([{"method": "deepcluster"}, parse_overrides(argv)])
    except ConfigError as err:
        assert str(err)
        return
    assert isinstance(cfg, TrainConfig) and cfg.method == "deepcluster"
    assert cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.rounds >= 1


@FUZZ
@given(x=features(), data=st.data())
def test_non_finite_features_are_a_clustering_error_naming_how_many(x, data):
    n = x.shape[0]
    rows = data.draw(st.sets(st.integers(0, n - 1), min_size=1))
    x[list(rows), data.draw(st.integers(0, x.shape[1] - 1))] = data.draw(st.sampled_from([math.nan, math.inf,
                                                                                          -math.inf]))
    for cluster in (lambda: kmeans(x, 1), lambda: pca_whiten(x, 2)):
        try:
            cluster()
        except ClusteringError as err:
            assert f"{len(rows)} of {n} feature rows are NaN or infinite" in str(err)
        else:
            raise AssertionError("no ClusteringError")
