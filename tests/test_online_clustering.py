"""SwAV, DeepClusterV2 and SeLa, and the building blocks they share: Sinkhorn-Knopp against the authors' formulas,
spherical k-means, prototypes, the queue, multi-crop views, the losses by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import context
from sklearn.metrics import normalized_mutual_info_score

from deepclust.augment import Augment, small_crop
from deepclust.augment import test_transform as clean_pixels
from deepclust.backbones import Backbone
from deepclust.cluster.kmeans import spherical_kmeans
from deepclust.cluster.sinkhorn import sinkhorn, sinkhorn_labels, sinkhorn_log
from deepclust.epoch import make_batch
from deepclust.heads import EmbeddingQueue, Prototypes, embed_crops
from deepclust.losses import invariant_spreading_loss, multi_head_cross_entropy, swapped_prediction_loss
from deepclust.methods import METHODS


def swav_code_sinkhorn(out: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """The SwAV code's ``distributed_sinkhorn`` in one process, written out as it is there (exp domain)."""
    q = torch.exp(out / epsilon).t()  # K x B
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def sela_code_labels(logits: torch.Tensor, lamb: float, iters: int) -> torch.Tensor:
    """SeLa's ``optimize_L_sk`` as its code runs it: P = softmax ** lambda, alternating r and c scalings."""
    p = F.softmax(logits.double(), dim=1).t() ** lamb  # K x N
    k, n = p.shape
    r, c = torch.ones(k, 1, dtype=torch.float64) / k, torch.ones(n, dtype=torch.float64) / n
    inv_k, inv_n = 1.0 / k, 1.0 / n
    for _ in range(iters):
        r = inv_k / (p @ c).unsqueeze(1)
        c = inv_n / (r.t() @ p).squeeze(0)
    return (p * r * c.unsqueeze(0)).argmax(0)


def test_sinkhorn_equals_the_swav_codes_formula_and_balances_the_prototypes():
    gen = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(64, 8, generator=gen), dim=1) @ F.normalize(torch.randn(10, 8, generator=gen),
                                                                                  dim=1).t()
    given = scores.clone()
    ours = sinkhorn(scores, 0.05, 3)
    assert torch.equal(scores, given)  # it rescales its own copy in place, never the caller's scores
    assert torch.allclose(ours, swav_code_sinkhorn(scores, 0.05, 3), atol=1e-5, rtol=1e-4)
    assert torch.allclose(ours.sum(1), torch.ones(64), atol=1e-5)  # each sample's codes: a distribution
    many = sinkhorn(scores, 0.05, 200)
    assert torch.allclose(many.sum(0), torch.full((10,), 6.4), atol=1e-3)  # each prototype: n / K


def test_sinkhorn_survives_scores_that_overflow_the_exp_domain():
    scores = torch.tensor([[80.0, -80.0], [-80.0, 80.0], [80.0, -80.0], [-80.0, 80.0]])
    codes = sinkhorn(scores, 0.01, 3)  # exp(8000) overflows float32 in the SwAV code's form: shifted, it does not
    assert torch.isfinite(codes).all() and torch.equal(codes.argmax(1), torch.tensor([0, 1, 0, 1]))
    logits = torch.tensor([[60.0, 0.0, 0.0], [61.0, 2.0, 0.0], [59.0, 0.0, 3.0]])  # x 25: exp(-1500) is 0 in float64
    assert torch.equal(sinkhorn_log(logits, 1 / 25, 50).argmax(1), torch.tensor([0, 1, 2]))
    assert torch.equal(sinkhorn_labels(logits, 25, 50), torch.tensor([0, 1, 2]))  # falls back to the log domain


def test_sinkhorn_ignores_inactive_rows():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(20, 5, generator=gen)
    active = torch.arange(20) >= 8  # a queue that is not full: its 8 rows take no part
    codes = sinkhorn(scores, 0.1, 4, active)
    assert torch.equal(codes[:8], torch.zeros(8, 5))
    assert torch.allclose(codes[8:], sinkhorn(scores[8:], 0.1, 4), atol=1e-6)


def test_sinkhorn_at_one_over_lambda_gives_selas_labels():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(300, 6, generator=gen) * 2
    logits[:, 0] += 3  # the prototype every sample prefers: the equal-size constraint must spread them
    ours = sinkhorn_log(logits, 1 / 25, 400).argmax(1)
    assert torch.equal(ours, sela_code_labels(logits, 25, 400))
    assert torch.equal(sinkhorn_labels(logits, 25, 400), ours)  # the scaling-vector form SeLa uses
    sizes = torch.bincount(ours, minlength=6)
    assert sizes.max() - sizes.min() <= 6  # about 50 each, though 0 was the favourite of all


def test_spherical_kmeans_recovers_planted_directions_and_keeps_an_empty_clusters_centroid():
    gen = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(4, 16, generator=gen), dim=1)
    truth = torch.arange(400) % 4
    x = centres[truth] + 0.05 * torch.randn(400, 16, generator=gen)
    # seed 8 starts from one row of each direction (as DeepClusterV2, random rows: another seed may start two in
    # one direction and stay in that local optimum); the rows are normalised first, so the scale does nothing
    centroids, labels = spherical_kmeans(x * 7, 4, iters=10, seed=8)
    assert normalized_mutual_info_score(truth, labels) == pytest.approx(1.0)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(4))
    assert torch.equal(labels, (F.normalize(x, dim=1) @ centroids.t()).argmax(1))
    # two identical rows start two identical centroids: argmax gives all to the first, the other stays empty
    # and keeps its centroid, as the SwAV code's k-means does (no split)
    same = torch.cat((torch.ones(3, 2), torch.tensor([[1.0, -1.0]])))
    centroids, labels = spherical_kmeans(same, 3, iters=3, seed=0)
    assert torch.bincount(labels, minlength=3).tolist().count(0) == 1
    assert torch.allclose(centroids.norm(dim=1), torch.ones(3))


def test_swapped_prediction_loss_by_hand():
    s = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]])]
    q = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.25, 0.75]])]
    t = 0.5

    def ce(code, score):
        return -(code * torch.log_softmax(score / t, 1)).sum()

    want = ((ce(q[0], s[1]) + ce(q[0], s[2])) / 2 + (ce(q[1], s[0]) + ce(q[1], s[2])) / 2) / 2
    assert swapped_prediction_loss(s, q, t) == pytest.approx(float(want), rel=1e-6)
    # two heads, two crops: each head's mean cross-entropy over both crops' rows, then the mean over heads
    logits = [torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [3.0, 0.0]])]
    targets = [torch.tensor([0]), torch.tensor([1])]
    head0 = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(1 / (1 + math.exp(2)))) / 2
    head1 = -(math.log(0.5) + math.log(1 / (math.exp(3) + 1))) / 2
    assert multi_head_cross_entropy(logits, targets, crops=2) == pytest.approx((head0 + head1) / 2, rel=1e-6)


def test_prototypes_pass_no_gradient_while_frozen_and_stay_on_the_sphere():
    protos = Prototypes(4, [3], freeze_steps=2)
    z = F.normalize(torch.randn(5, 4), dim=1)
    grads = []
    for _ in range(3):
        protos.zero_grad()
        protos(z)[0].sum().backward()
        grads.append(protos.head0.grad.abs().sum().item())
        with torch.no_grad():
            protos.head0.mul_(3)
        protos.normalize_()
    assert grads[0] == 0 and grads[1] == 0 and grads[2] > 0
    assert torch.allclose(protos.head0.norm(dim=1), torch.ones(3))
    fixed = Prototypes(4, [3, 5], learnable=False)
    assert [p.shape for p in fixed(z)] == [(5, 3), (5, 5)] and not list(fixed.parameters())


def test_the_queue_puts_the_newest_rows_first_and_is_full_after_length_rows():
    queue = EmbeddingQueue(2, 5, 3)
    first = [torch.full((3, 3), 1.0), torch.full((3, 3), -1.0)]
    queue.push(first)
    assert not bool(queue.full()) and queue.rows[0, :3].eq(1).all() and queue.rows[0, 3:].eq(0).all()
    queue.push([torch.full((3, 3), 2.0), torch.full((3, 3), -2.0)])
    assert bool(queue.full())
    assert queue.rows[0, :, 0].tolist() == [2, 2, 2, 1, 1] and queue.rows[1, :, 0].tolist() == [-2, -2, -2, -1, -1]


def test_multi_crop_views_come_in_their_sizes_and_are_encoded_by_size():
    backbone = Backbone("convnet", 32, width=8)
    method = METHODS["swav"](backbone, 64, METHODS["swav"].Config(small_crops=3, prototypes=10))
    assert method.views == 5 and small_crop(Augment(32)).size == 18
    pixels = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    batch = make_batch(method, Augment(32), pixels, torch.arange(8), np.arange(8), 8, slice(0, 8),
                       torch.Generator().manual_seed(0), False)
    assert [v.shape[-1] for v in batch.views] == [32, 32, 18, 18, 18]
    calls = []

    def encode(x):
        calls.append(x.shape[0])
        return x.mean((1, 2, 3)).unsqueeze(1)
    out = embed_crops(encode, batch.views)
    assert calls == [16, 24] and len(out) == 5  # the 2 large crops in one forward, the 3 small in another
    assert torch.allclose(out[3], batch.views[3].mean((1, 2, 3)).unsqueeze(1))


def test_multi_crop_for_is_and_pcps_warm_up_pairs_each_small_crop_with_each_large_one():
    torch.manual_seed(0)
    pixels = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)

    def batch_of(method):
        return make_batch(method, Augment(32), pixels, torch.arange(8), np.arange(8), 8, slice(0, 8),
                          torch.Generator().manual_seed(0), False)
    plain = METHODS["is"](Backbone("convnet", 32, width=8), 8)
    batch = batch_of(plain)
    z1, z2 = plain.backbone(torch.cat(batch.views)).chunk(2)
    assert plain.views == 2 and torch.equal(plain.loss(batch)[0], invariant_spreading_loss(z1, z2, 0.1))

    multi = METHODS["is"](Backbone("convnet", 32, width=8), 8, METHODS["is"].Config(small_crops=2))
    multi.load_state_dict(plain.state_dict())
    batch = batch_of(multi)
    assert multi.views == 4 and [v.shape[-1] for v in batch.views] == [32, 32, 18, 18]
    large = multi.backbone(torch.cat(batch.views[:2])).chunk(2)
    small = multi.backbone(torch.cat(batch.views[2:])).chunk(2)
    z = [*large, *small]
    pairs = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3)]  # the large pair, then each small crop with each large one
    by_hand = sum(invariant_spreading_loss(z[a], z[b], 0.1) for a, b in pairs) / 5
    assert torch.allclose(multi.loss(batch)[0], by_hand, atol=1e-6)

    pcp = METHODS["pcp"](Backbone("convnet", 32, width=8), 8, METHODS["pcp"].Config(small_crops=3, min_clusters=2))
    assert pcp.views == 5 and pcp.view_augment(4, Augment(32)).size == 18  # the warm-up's IS branch
    pcp.t = 1.0  # the warm-up over: one view, no small crops
    assert pcp.views == 1


def planted_images(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 3, 16, 16), generator=gen, dtype=torch.uint8)
    images[torch.arange(n), labels] += 150  # a colour per class
    return images, labels


def test_sela_labels_are_equal_sized_and_deepclusterv2s_prototypes_are_its_centroids():
    torch.manual_seed(0)
    images, labels = planted_images()
    noise = torch.randint(0, 255, (96, 3, 16, 16), dtype=torch.uint8)
    sela = METHODS["sela"](Backbone("convnet", 16, width=8), 96, METHODS["sela"].Config(k=3, heads=2))
    with torch.no_grad():
        sela.classifiers[0].bias.copy_(torch.tensor([50.0, 0.0, 0.0]))  # every sample's argmax logit: cluster 0
    sela.before_epoch(context(sela, noise))
    feats = sela.backbone.eval().features(clean_pixels(noise, 16))
    assert sela.classifiers[0](feats).argmax(1).eq(0).all()
    for h in range(2):  # the equal-size constraint spreads them (argmax of the plan: about, not exactly, 32)
        assert 16 <= torch.bincount(sela.labels[h], minlength=3).min() <= 32
    assert torch.equal(sela.cluster_assignments(), sela.labels[0])
    dc = METHODS["deepclusterv2"](Backbone("convnet", 16, width=8), 96, METHODS["deepclusterv2"].Config(k=3, heads=2))
    dc.before_epoch(context(dc, images, labels))
    for h in range(2):
        protos = getattr(dc.prototypes, f"head{h}")
        assert torch.equal(dc.assignments[h], (dc.memory[h % 2] @ protos.t()).argmax(1))
    assert normalized_mutual_info_score(labels, dc.assignments[0]) > 0.9  # the colours, from the clean pass
    loss, out = dc.loss(make_batch(dc, Augment(16), images[:8], torch.arange(8), np.arange(8), 8, slice(0, 8),
                                   torch.Generator().manual_seed(0), False))
    dc.after_step(make_batch(dc, Augment(16), images[:8], torch.arange(8), np.arange(8), 8, slice(0, 8),
                             torch.Generator().manual_seed(0), False), out)
    assert torch.allclose(dc.memory[1, :8], out["embedding1"]) and torch.isfinite(loss)


def test_swavs_queue_joins_the_codes_only_once_full():
    torch.manual_seed(0)
    images, labels = planted_images(32)
    cfg = METHODS["swav"].Config(prototypes=6, queue_length=16, queue_start=0.0)
    swav = METHODS["swav"](Backbone("convnet", 16, width=8), 32, cfg).eval()  # eval: BN fixed, repeatable
    swav.before_epoch(context(swav, images, labels))
    z = F.normalize(torch.randn(8, swav.backbone.embed_dim), dim=1)
    scores = swav.prototypes(z)[0]
    alone = sinkhorn(scores, 0.05, 3)
    swav.queue.push([F.normalize(torch.randn(8, 128), dim=1)] * 2)
    assert torch.allclose(swav.codes(scores, 0), alone, atol=1e-6)  # half full: not used
    swav.queue.push([F.normalize(torch.randn(8, 128), dim=1)] * 2)
    with_queue = swav.codes(scores, 0)
    assert not torch.allclose(with_queue, alone, atol=1e-3)
    both = torch.cat((swav.prototypes(swav.queue.rows[0])[0], scores))
    assert torch.allclose(with_queue, sinkhorn(both, 0.05, 3)[16:], atol=1e-6)


def test_lars_scales_each_weights_step_by_its_trust_ratio_and_leaves_biases_plain():
    from deepclust.optim import LARS

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])  # |g| = 2
    opt.step()
    ratio = 0.02 * 5 / (2 + 0.1 * 5 + 1e-9)  # 0.04, under the clip 1 / lr = 2
    step = (torch.tensor([[0.0, 2.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])) * ratio
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * step)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 0.5]))  # 1-d: plain SGD, no weight decay
    w.grad, b.grad = torch.zeros(1, 2), torch.zeros(1)  # a zero gradient: ratio 1, the momentum carries on
    before = w.detach().clone()
    opt.step()
    assert torch.allclose(w.detach(), before - 0.5 * (0.9 * step + 0.1 * before))


def test_warm_up_then_cosine_over_the_epochs_left():
    from deepclust.config import TrainConfig
    from deepclust.train import lr_at

    cfg = TrainConfig(epochs=6, lr=0.6, lr_schedule="cosine", warmup_epochs=2)
    assert [lr_at(cfg, e) for e in range(6)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.3 * (1 + math.cos(math.pi / 4)), 0.3, 0.3 * (1 + math.cos(3 * math.pi / 4))])
