"""Each method at its own paper's recipe (configs/own/*.yaml): the files resolve, say what they change, and train."""

from __future__ import annotations

import pytest
import torch
from helpers import read_rows, tiny_npz

from deepclust.backbones import Backbone
from deepclust.config import CONFIG_DIR, read_yaml, resolve
from deepclust.methods.odc import ODC
from deepclust.train import train

OWN = sorted(p.stem for p in (CONFIG_DIR / "own").glob("*.yaml"))


def test_the_clustering_recipes_are_there():
    assert OWN == ["and", "deepcluster", "deepclusterv2", "odc", "pcp", "sela", "swav", "uic"]


@pytest.mark.parametrize("method", OWN)
def test_an_own_recipe_resolves_to_its_papers_keys(method):
    recipe = read_yaml(CONFIG_DIR / "own" / f"{method}.yaml")
    train_cfg, hparams = resolve([recipe])
    assert train_cfg.method == method
    for key, value in recipe.items():  # every key written is the value the run gets
        got = getattr(train_cfg, key) if hasattr(train_cfg, key) else getattr(hparams, key)
        assert got == value or (value is None and key in ("k", "min_clusters")), key


def test_the_recipes_differ_from_the_shared_protocol_where_their_papers_do():
    shared = {m: resolve([{"method": m}]) for m in OWN}
    own = {m: resolve([read_yaml(CONFIG_DIR / "own" / f"{m}.yaml")]) for m in OWN}
    dc, dc_shared = own["deepcluster"][0], shared["deepcluster"][0]
    assert (dc.lr_decay_at, dc.sobel, dc.weight_decay) == ([], True, 1e-5) and dc_shared.lr_decay_at == [0.6, 0.8]
    assert own["uic"][0].lr_schedule == "linear" and shared["uic"][0].lr_schedule == "step"
    assert own["odc"][1].head_momentum == 0.0 and shared["odc"][1].head_momentum is None
    assert own["pcp"][0].rounds == 5 and shared["pcp"][0].rounds == 1
    for m in ("swav", "deepclusterv2"):  # solo-learn's CIFAR recipes: LARS with warm-up and cosine
        assert (own[m][0].optimizer, own[m][0].lr_schedule, own[m][0].warmup_epochs) == ("lars", "cosine", 10)
        assert shared[m][0].optimizer == "sgd" and own[m][1].projector_hidden == 2048
    assert own["swav"][1].queue_length == 3840 and shared["swav"][1].queue_length == 0


@pytest.mark.parametrize("method", OWN)
def test_an_own_recipe_trains_on_tiny_data(tmp_path, method):
    data = tiny_npz(tmp_path, n=160)
    recipe = read_yaml(CONFIG_DIR / "own" / f"{method}.yaml")
    small = {"data": data, "test_data": data, "backbone": "convnet", "width": 8, "epochs": 2,
             "out": str(tmp_path / "r"), "progress": False, "device": "cpu", "batch_size": 32,
             "rounds": min(2, recipe.get("rounds", 1))}
    small.update({"k": 8} if "k" in recipe else {}, **({"min_clusters": 8} if method == "pcp" else {}))
    small.update({"min_cluster": 2} if method == "odc" else {}, **({"fft_epochs": 1} if method == "uic" else {}))
    small.update({"queue_length": 64, "projector_hidden": 32, "prototypes": 16} if method == "swav" else {},
                 **({"projector_hidden": 32, "warmup_epochs": 1} if method in ("swav", "deepclusterv2") else {}))
    cfg, hp = resolve([recipe, small])
    train(cfg, hp)
    rows = read_rows(tmp_path / "r")
    assert len(rows) == 2 * cfg.rounds and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.parametrize("head_momentum, ratio", [(0.0, 1.0), (None, 1.9)])
def test_odc_head_momentum_sets_the_classifiers_momentum_only(head_momentum, ratio):
    method = ODC(Backbone("convnet", 16, width=8), 64, ODC.Config(k=4, min_cluster=0, head_momentum=head_momentum))
    opt = torch.optim.SGD(method.param_groups(), lr=0.1, momentum=0.9)
    head, trunk = method.classifier.weight, next(method.backbone.parameters())
    moves = []
    for _ in range(2):  # the same gradient twice: the second step is (1 + momentum) times the first
        before = head.detach().clone(), trunk.detach().clone()
        for p in method.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        moves.append(((before[0] - head.detach()).abs().mean(), (before[1] - trunk.detach()).abs().mean()))
    assert float(moves[1][0] / moves[0][0]) == pytest.approx(ratio, rel=1e-4)
    assert float(moves[1][1] / moves[0][1]) == pytest.approx(1.9, rel=1e-4)  # the trunk keeps the trainer's


@pytest.mark.parametrize("profile, methods", [
    ("cpu-own", {"deepclusterv2", "sela", "swav"}),
    ("medium-own", {"deepcluster", "odc", "uic", "and", "pcp", "deepclusterv2", "sela", "swav"}),
])
def test_the_own_profiles_scale_each_clustering_recipe_into_their_run(profile, methods):
    """benchmarks' cpu-own and medium-own profiles: what a recipe of issue 30 counts in steps, epochs or clusters
    of a 50,000-image run is scaled into the 5,000-image, 15-epoch run or the 10,000-image, 50-epoch one (the
    files' 391 frozen steps or 3000 clusters would not fit)."""
    from benchmarks.profiles import PROFILES

    spec = PROFILES[profile]
    shared = {k: v for k, v in spec["train"].items() if k not in ("data", "test_data")}
    assert set(spec["methods"]) == methods
    for method in ("deepclusterv2", "sela", "swav"):
        keys = spec["methods"][method]
        cfg, hp = resolve([{**shared, "method": method, **keys}])
        steps = cfg.epochs * -(-cfg.subset // cfg.batch_size)
        assert cfg.batch_size == 256 and cfg.warmup_epochs < cfg.epochs / 10, method
        assert getattr(hp, "freeze_prototypes_steps", 0) <= steps / 7, method  # solo-learn: 2 of its epochs
        assert getattr(hp, "k", 1) * 10 <= cfg.subset, method  # at least 10 images a cluster
