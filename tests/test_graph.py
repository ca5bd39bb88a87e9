"""kNN graphs (exact and approximate) and the strongly-connected-subgraph search of PAD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from deepclust.cluster import knn_graph, member_table, scs_stats, singletons_apart, strongly_connected_subgraphs
from deepclust.cluster.graph import exact_knn_graph, ivf_knn_graph, topk_by_group_max


def brute_force(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = x @ x.t()
    s.fill_diagonal_(float("-inf"))
    return s.topk(k, dim=1)


# --- kNN graph ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "block_elements"), [(2, 9), (7, 9), (130, 9), (130, 4096), (1001, 4096), (1001, 2**20)])
@pytest.mark.parametrize("compiled", [True, False])
def test_exact_knn_graph_equals_brute_force(n, block_elements, compiled):
    x = F.normalize(torch.randn(n, 24, generator=torch.Generator().manual_seed(n)), dim=1)
    k = min(5, n - 1)
    want_sims, want_idx = brute_force(x, k)
    sims, idx = exact_knn_graph(x, k, block_elements=block_elements, compiled=compiled)
    assert torch.allclose(sims, want_sims, atol=1e-5)
    assert torch.equal(idx, want_idx)  # random data: no ties


def test_knn_graph_float64_and_with_self():
    x = F.normalize(torch.randn(300, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=1)
    sims, idx = knn_graph(x, 4, exclude_self=False)
    assert torch.equal(idx[:, 0], torch.arange(300))  # itself first
    want = (x @ x.t()).topk(4, dim=1)
    assert torch.equal(idx, want.indices) and torch.allclose(sims, want.values)


def test_knn_graph_bfloat16_takes_the_torch_path():
    x = F.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    _, idx = knn_graph(x.bfloat16(), 3)
    assert (idx == brute_force(x.bfloat16().float(), 3)[1]).float().mean() > 0.95  # bf16 rounding may swap ties


def test_topk_by_group_max_equals_topk_including_ties_and_transposed_views():
    s = torch.randint(0, 5, (40, 1003)).float()  # many ties: compare values, and that indices hold them
    for view in (s, s[:, :1000].t()):
        vals, idx = topk_by_group_max(view, 6)
        assert torch.equal(vals, view.topk(6, dim=1).values)
        assert torch.equal(view.gather(1, idx), vals) and all(len(set(r)) == 6 for r in idx.tolist())


def test_ivf_knn_graph_searching_every_list_is_exact():
    x = F.normalize(torch.randn(2000, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    _, idx = ivf_knn_graph(x, 5, nprobe=10_000)
    assert torch.equal(idx, brute_force(x, 5)[1])


def test_knn_graph_too_many_neighbours_is_a_clear_error():
    with pytest.raises(ValueError, match="k = 5 neighbours but only 5 rows"):
        knn_graph(F.normalize(torch.randn(5, 3), dim=1), 5)


# --- SCS search -------------------------------------------------------------------------------------------------

# 0 <-> 1 mutual; 2 -> 3 -> 4 -> 0 closes an ear through 1 -> 2; 5 <-> 3/4; 6 reaches 5 but nothing returns.
HAND = torch.tensor([[1, 2], [0, 2], [3, 0], [4, 5], [2, 0], [4, 3], [5, 0]])


def test_scs_hand_built_graph():
    assert strongly_connected_subgraphs(HAND, 10).tolist() == [0, 0, 0, 0, 0, 0, -1]
    # cap 2: {0, 1}; from 2 the ear 2-3-4 no longer fits; from 3: 3 -> 5 -> 3.
    assert strongly_connected_subgraphs(HAND, 2).tolist() == [0, 0, -1, 1, -1, 1, -1]
    # cap 3: {0, 1}, then from 1 the ear 2 -> 0 fits: {0, 1, 2}; from 3: 3 -> 4 leads nowhere, 3 -> 5 -> 3: {3, 5}
    assert strongly_connected_subgraphs(HAND, 3).tolist() == [0, 0, 0, 1, -1, 1, -1]
    # without the cyclic constraint every reached vertex joins; 6 is left alone
    assert strongly_connected_subgraphs(HAND, 10, cyclic=False).tolist() == [0, 0, 0, 0, 0, 0, -1]
    assert strongly_connected_subgraphs(HAND, 3, cyclic=False).tolist() == [0, 0, 0, 1, 1, 1, -1]


def test_scs_two_triangles_and_a_tail_in_a_given_order():
    nb = torch.tensor([[1], [2], [0], [4], [5], [3], [0]])
    assert strongly_connected_subgraphs(nb, 10).tolist() == [0, 0, 0, 1, 1, 1, -1]
    assert strongly_connected_subgraphs(nb, 10, order=torch.tensor([6, 5, 4, 3, 2, 1, 0])).tolist() == \
        [1, 1, 1, 0, 0, 0, -1]
    assert strongly_connected_subgraphs(nb, 2).tolist() == [-1] * 7  # no cycle of 2 exists
    assert strongly_connected_subgraphs(nb, 2, cyclic=False).tolist() == [0, 0, -1, 1, 1, -1, -1]


def test_scs_rejects_bad_input():
    with pytest.raises(ValueError, match="max_size must be at least 2"):
        strongly_connected_subgraphs(HAND, 1)
    with pytest.raises(ValueError, match=r"neighbour ids must lie in \[0, 7\)"):
        strongly_connected_subgraphs(HAND + 5, 10)
    with pytest.raises(ValueError, match=r"neighbour ids must lie in \[0, 7\)"):  # not wrapped into range by int32
        strongly_connected_subgraphs(HAND + 2**32, 10)


@st.composite
def graphs(draw):
    n = draw(st.integers(2, 40))
    k = draw(st.integers(1, 4))
    edges = draw(st.lists(st.lists(st.integers(-1, n - 1), min_size=k, max_size=k), min_size=n, max_size=n))
    cap = draw(st.one_of(st.none(), st.integers(2, 12)))
    order = draw(st.permutations(range(n)))
    return torch.tensor(edges), cap, torch.tensor(order)


@settings(max_examples=300, deadline=None)
@given(graphs(), st.booleans())
def test_scs_groups_are_disjoint_capped_and_strongly_connected_inside(graph, cyclic):
    nb, cap, order = graph
    n = nb.shape[0]
    group = strongly_connected_subgraphs(nb, cap, cyclic=cyclic, order=order)
    assert group.shape == (n,) and group.min() >= -1
    ids = group[group >= 0]
    count = int(ids.max()) + 1 if ids.numel() else 0
    sizes = torch.bincount(ids, minlength=count)
    assert torch.all(sizes >= 2) and (cap is None or torch.all(sizes <= cap))  # ids 0..G-1, each a real group
    if not cyclic:
        return
    for g in range(count):
        members = torch.nonzero(group == g).flatten().numpy()
        local = {v: i for i, v in enumerate(members.tolist())}
        rows, cols = zip(*[(local[u], local[w]) for u in local for w in nb[u].tolist() if w in local], strict=True)
        inside = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(local), len(local)))
        assert connected_components(inside, directed=True, connection="strong")[0] == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-1, 5), min_size=1, max_size=30))
def test_member_table_lists_each_groups_members_ascending(ids):
    group = torch.tensor(ids)
    used = sorted(set(ids) - {-1})
    group = torch.tensor([used.index(g) if g >= 0 else -1 for g in ids])  # ids 0..G-1, as the search gives
    table = member_table(group)
    if not used:
        assert table.tolist() == [[-1]]
        return
    assert table.shape == (len(used), max(ids.count(g) for g in used))
    for g in range(len(used)):
        members = [i for i, x in enumerate(group.tolist()) if x == g]
        assert table[g].tolist() == members + [-1] * (table.shape[1] - len(members))


def test_scs_on_planted_clusters_is_precise_and_stats_add_up():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(20, 32, generator=gen), dim=1)
    labels = torch.arange(400) % 20
    x = F.normalize(centres[labels] + 0.05 * torch.randn(400, 32, generator=gen), dim=1)
    group = strongly_connected_subgraphs(knn_graph(x, 5)[1], 10)
    stats = scs_stats(group, labels)
    assert stats["scs_precision"] == 1.0 and stats["scs_max_size"] <= 10
    assert stats["scs_share"] > 0.8
    assert stats["scs_count"] == int(group.max()) + 1
    assert stats["scs_mean_size"] == pytest.approx(stats["scs_share"] * 400 / stats["scs_count"])
    apart = singletons_apart(group)
    assert apart.unique().numel() == stats["scs_count"] + int((group < 0).sum())


def test_scs_precision_is_pairwise():
    group = torch.tensor([0, 0, 0, 1, 1, -1])
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    # sample 0: 1 of 2 fellows share its class, 1: 1/2, 2: 0/2, 3: 1/1, 4: 1/1
    assert scs_stats(group, labels)["scs_precision"] == pytest.approx((0.5 + 0.5 + 0 + 1 + 1) / 5)
