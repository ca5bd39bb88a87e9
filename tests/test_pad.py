"""PAD: the loss against hand-computed values, the per-epoch SCS statistics, the ablation flags, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_resume_equals_uninterrupted, read_rows, run_cfg

from deepclust.backbones import Backbone
from deepclust.config import ConfigError
from deepclust.methods import Batch, EpochContext
from deepclust.methods.pad import PAD
from deepclust.train import train


def log_softmax(v: np.ndarray) -> np.ndarray:
    v = v - v.max()
    return v - np.log(np.exp(v).sum())


def tiny_pad(**config) -> PAD:
    torch.manual_seed(0)
    method = PAD(Backbone("convnet", 16, embed_dim=4, width=8), 6, PAD.Config(**config))
    method.bank.fill(torch.randn(6, 4))
    method.scs.copy_(torch.tensor([0, 0, 0, -1, 1, 1]))
    return method.eval()  # BN on running statistics: the same forward twice gives the same output


@pytest.mark.parametrize("hpe", ["kl", "cosine", "false"])
def test_pad_loss_equals_hand_computed_group_loss_plus_hard_positive_term(hpe):
    method = tiny_pad(hpe=hpe, tau=0.5)
    views = [torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(v)) for v in (1, 2)]
    index = torch.tensor([1, 3, 4])
    rows = method.view_rows(1, index)  # the trainer augments the second view only for these rows
    assert method.view_rows(0, index) is None and rows.tolist() == ([1] if hpe != "false" else [])
    loss, _ = method.loss(Batch([views[0], views[1][rows]], index))

    with torch.no_grad():
        z, z2 = method.backbone(views[0]).double().numpy(), method.backbone(views[1]).double().numpy()
    bank, tau = method.bank.features.double().numpy(), 0.5
    groups = {1: [0, 1, 2], 3: [3], 4: [4, 5]}
    scs, hpe_terms = [], []
    for row, i in enumerate(index.tolist()):
        logp = log_softmax(z[row] @ bank.T / tau)
        scs.append(-np.log(sum(np.exp(logp[j]) for j in groups[i])))
        fellows = [j for j in groups[i] if j != i]
        # hard positive: the fellow least similar to z_i; an isolated sample's is its other view
        target = bank[min(fellows, key=lambda j: z[row] @ bank[j])] if fellows else z2[row]
        if hpe == "kl":
            logq = log_softmax(target @ bank.T / tau)
            hpe_terms.append(sum(np.exp(logp[j]) * (logp[j] - logq[j]) for j in range(6)))
        else:
            hpe_terms.append(1 - z[row] @ target / (np.linalg.norm(z[row]) * np.linalg.norm(target)))
    want = np.mean(scs) + (0.8 * np.mean(hpe_terms) if hpe != "false" else 0.0)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)


def test_pad_without_diffusion_uses_the_knn_neighbourhood():
    method = tiny_pad(diffusion=False, k=2, tau=0.5)
    method.neighbours.copy_(torch.tensor([[1, 2], [0, 2], [1, 0], [4, 5], [3, 5], [4, 3]]))
    assert method.fellows(torch.tensor([0, 3])).tolist() == [[1, 2], [4, 5]]


def test_pad_bad_hpe_and_k_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="hpe must be one of kl, cosine, false"):
        tiny_pad(hpe="fcs")
    with pytest.raises(ValueError, match="k = 6 neighbours"):
        tiny_pad(k=6)
    with pytest.raises(ConfigError, match="max_size"):
        run_cfg(tmp_path, "pad", max_size="ten")


def test_pad_logs_scs_statistics_every_epoch(tmp_path):
    cfg, hp = run_cfg(tmp_path, "pad", epochs=3)
    train(cfg, hp)
    rows = read_rows(tmp_path / "run")
    assert len(rows) == 3
    for row in rows:
        assert 2 <= row["scs_max_size"] <= 10 and 2 <= row["scs_mean_size"] <= row["scs_max_size"]
        assert 0 < row["scs_share"] <= 1 and 0 <= row["scs_precision"] <= 1
        assert row["scs_count"] * row["scs_mean_size"] == pytest.approx(96 * row["scs_share"])
        assert row["graph_time"] >= 0 and row["scs_time"] >= 0


@pytest.mark.parametrize("flags", [{"diffusion": False}, {"cyclic": False, "max_size": None}, {"hpe": "cosine"}])
def test_pad_ablations_train(tmp_path, flags):
    cfg, hp = run_cfg(tmp_path, "pad", epochs=1, **flags)
    row = train(cfg, hp)
    assert np.isfinite(row["loss"]) and row["knn_top1"] is not None
    assert ("neighbour_precision" in row) == (flags.get("diffusion") is False)


def test_pad_resume_restores_the_graph_and_groups(tmp_path):
    assert_resume_equals_uninterrupted(tmp_path, "pad", stop_after=1, epochs=2, lr_decay_at=[0.5], eval_every=1)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["state"]
    assert state["scs"].shape == (96,) and state["neighbours"].shape == (96, 5)
    assert (state["scs"] >= 0).any()


def test_pad_groups_come_from_the_bank_graph():
    method = tiny_pad(k=2)
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(2, 4, generator=gen), dim=1)
    method.bank.fill(centres[torch.tensor([0, 0, 0, 1, 1, 1])] + 0.01 * torch.randn(6, 4, generator=gen))
    method.bank_filled.fill_(True)
    ctx = EpochContext(0, 0, 1, 1, 0, gen, torch.device("cpu"), lambda *a, **k: None,
                       torch.tensor([0, 0, 0, 1, 1, 1]))
    method.before_epoch(ctx)
    assert method.stats["scs_precision"] == 1.0 and method.stats["scs_share"] == 1.0
    assert method.scs[:3].unique().numel() == 1 and method.scs[3:].unique().numel() == 1


def test_plot_scs_reads_only_runs_with_scs_statistics(tmp_path):
    import json

    from benchmarks.plot_scs import main, scs_curves

    for name, rows in (("pad", [{"global_epoch": e, "scs_share": 0.5 + e / 10, "scs_mean_size": 3.0,
                                 "scs_precision": 0.9} for e in range(3)]),
                       ("npid", [{"global_epoch": 0, "loss": 1.0}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = scs_curves(tmp_path)
    assert list(runs) == ["pad"] and [r["scs_share"] for r in runs["pad"]] == [0.5, 0.6, 0.7]
    assert main([str(tmp_path)]) == 0 and (tmp_path / "scs_curves.png").stat().st_size > 0
    assert main([str(tmp_path / "npid")]) == 1
