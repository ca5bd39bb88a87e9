"""The building blocks and a short training run of every method on each device of the ``device`` fixture: the
CPU here and in CI, and CUDA as well where a GPU is visible (benchmarks/gpu_check runs this file there, with
DEEPCLUST_SYNC_DEBUG=error so that a host-device sync in a training step fails). Each result is checked against
a hand-computed value or the CPU's; the GPU memory check, the CUDA RNG across GPU counts and a mid-epoch resume
on another device's generator are checked on the CPU with their inputs made by hand."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import read_rows, run_cfg
from sklearn.metrics import normalized_mutual_info_score

from deepclust import train as trainer
from deepclust.augment import Augment, color_jitter_masked, color_jitter_rows
from deepclust.backbones import Backbone
from deepclust.checkpoint import load_checkpoint
from deepclust.cli import main
from deepclust.cluster import kmeans, knn_graph, pca_whiten
from deepclust.config import ConfigError
from deepclust.device_memory import GiB, check_device_memory, plan_training_memory
from deepclust.eval import knn_accuracy, linear_probe
from deepclust.eval.clustering import cluster_metrics
from deepclust.losses import group_loss, invariant_spreading_loss, neighbour_positives
from deepclust.memory import MemoryBank
from deepclust.methods import METHODS
from deepclust.runtime import configure_device
from deepclust.train import host_copy, no_buffer_sync, restore_cuda_rng, train

METHOD_KEYS = {"supervised": {}, "random": {}, "npid": {}, "is": {}, "and": {"rounds": 2, "epochs": 1},
               "pcp": {"min_clusters": 4, "vote_epochs": 1}, "pad": {}, "deepcluster": {"k": 4},
               "odc": {"k": 4, "min_cluster": 2}, "uic": {"k": 4}}


def planted(n: int = 300, d: int = 16, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=gen) * 4
    truth = torch.arange(n) % k
    return centres[truth] + torch.randn(n, d, generator=gen), truth


# --- augmentation ---------------------------------------------------------------------------------------------

def test_masked_colour_jitter_equals_the_row_by_row_one(device):
    images = torch.randint(0, 256, (64, 3, 12, 12), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    draw = Augment(12).draw(64, 12, 12, torch.Generator().manual_seed(1), "cpu")
    x = images.float() / 255
    rows = color_jitter_rows(x.clone(), draw)
    masked = color_jitter_masked(x.to(device), type(draw)(*(t.to(device) for t in vars(draw).values())))
    torch.testing.assert_close(masked.cpu(), rows, atol=1e-5, rtol=0)
    assert not torch.equal(rows, x)  # the jitter did change the images


def test_augmentation_on_the_device_equals_the_cpu_given_the_same_draw(device):
    images = torch.randint(0, 256, (16, 3, 20, 20), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    augment = Augment(16)
    draw = augment.draw(16, 20, 20, torch.Generator().manual_seed(3), "cpu")
    on_device = augment.apply(images.to(device), type(draw)(*(t.to(device) for t in vars(draw).values())))
    assert on_device.device.type == device.type and on_device.shape == (16, 3, 16, 16)
    torch.testing.assert_close(on_device.cpu(), augment.apply(images, draw), atol=1e-4, rtol=0)


# --- clustering, graphs, losses, memory -------------------------------------------------------------------------

def test_kmeans_recovers_planted_clusters(device):
    x, truth = planted()
    z = F.normalize(pca_whiten(x.to(device), 8), dim=1)
    result = kmeans(z, 5, iters=20, seed=0)
    assert result.assignments.device.type == device.type
    assert normalized_mutual_info_score(truth.numpy(), result.assignments.cpu().numpy()) > 0.95


def test_pca_whitening_has_unit_covariance(device):
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(4)) @ torch.randn(12, 12)
    z = pca_whiten(x.to(device), 6, chunk=64).double()  # several chunks of the float64 covariance
    cov = (z - z.mean(0)).t() @ (z - z.mean(0)) / (len(z) - 1)
    torch.testing.assert_close(cov.cpu(), torch.eye(6, dtype=torch.float64), atol=1e-3, rtol=0)


def test_knn_graph_equals_brute_force(device):
    x = F.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(5)), dim=1)
    sims, idx = knn_graph(x.to(device), 4)
    s = x @ x.t()
    s.fill_diagonal_(float("-inf"))
    want_sims, want_idx = s.topk(4, dim=1)
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(sims.cpu(), want_sims, atol=1e-5, rtol=0)


def test_group_loss_and_neighbour_positives_hand_computed(device):
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.3, 3.0, 1.0]], device=device)
    neighbours = torch.tensor([[2], [-1], [1], [0]], device=device)  # 1 has none: padding
    positives = neighbour_positives(torch.tensor([0, 1], device=device), neighbours)
    assert positives.cpu().tolist() == [[True, False, True, False], [False, True, False, False]]
    p = logits.cpu().softmax(1)
    expected = -(math.log(p[0, 0] + p[0, 2]) + math.log(p[1, 1])) / 2
    assert float(group_loss(logits, positives)) == pytest.approx(expected, rel=1e-5)


def test_invariant_spreading_loss_equals_the_cpu(device):
    gen = torch.Generator().manual_seed(6)
    z1, z2 = (F.normalize(torch.randn(8, 16, generator=gen), dim=1) for _ in range(2))
    want = invariant_spreading_loss(z1, z2)
    with torch.autocast(device.type, dtype=torch.bfloat16):  # the loss runs in float32 all the same
        got = invariant_spreading_loss(z1.to(device), z2.to(device))
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-4)


def test_memory_bank_update_and_float32_logits_under_autocast(device):
    bank = MemoryBank(10, 4, momentum=0.5).to(device)
    start = bank.features.clone()
    feats = torch.tensor([[3.0, 0, 0, 0], [0, 0, 2.0, 0]], device=device)
    bank.update(torch.tensor([1, 7], device=device), feats)
    want = F.normalize(0.5 * start[[1, 7]] + 0.5 * F.normalize(feats, dim=1), dim=1)
    torch.testing.assert_close(bank.features[[1, 7]], want)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = bank.logits(torch.randn(3, 4, device=device), tau=0.1)
    assert logits.dtype == torch.float32 and logits.shape == (3, 10)


# --- evaluation protocols ---------------------------------------------------------------------------------------

def test_knn_linear_and_cluster_protocols(device, sklearn_knn):
    points, labels = planted(n=500, k=4)
    x, truth, test, test_truth = points[:400], labels[:400], points[400:], labels[400:]
    xtr, xte = F.normalize(x, dim=1), F.normalize(test, dim=1)
    want = 100.0 * float((torch.from_numpy(sklearn_knn(xtr.numpy(), truth.numpy(), xte.numpy(), k=20))
                          == test_truth).double().mean())
    got = knn_accuracy(xte.to(device), test_truth.to(device), xtr.to(device), truth.to(device), k=20)
    assert got == pytest.approx(want)
    assert linear_probe(x.to(device), truth.to(device), test.to(device), test_truth.to(device)) > 95
    assert cluster_metrics(xte.to(device), test_truth.to(device))["nmi"] > 0.9


# --- a short training run of every method ------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHOD_KEYS))
def test_short_training_run_on_the_device(tmp_path, device, method, monkeypatch, keep_determinism_setting):
    monkeypatch.setenv("DEEPCLUST_SYNC_DEBUG", "error")  # on a GPU: any sync in the step loop raises
    keys = {"epochs": 1, **METHOD_KEYS[method]}
    cfg, hp = run_cfg(tmp_path, method, device=str(device), **keys)  # deterministic=true: on CUDA too
    row = train(cfg, hp)
    assert math.isfinite(row["knn_top1"])
    if METHODS[method].trains:
        assert all(math.isfinite(r["loss"]) for r in read_rows(tmp_path / "run"))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state"]  # saved from the device, loads here
    assert all(t.device.type == "cpu" and (not t.is_floating_point() or torch.isfinite(t).all())
               for t in state.values())


def test_embed_writes_the_features_computed_on_the_device(tmp_path, device, trained_checkpoint):
    out = tmp_path / "emb.npz"
    assert main(["embed", "--checkpoint", str(trained_checkpoint), "--data", "digits:test", "--out", str(out),
                 "--device", str(device)]) == 0
    with np.load(out) as z:
        assert z["features"].shape == (359, 128) and np.allclose(np.linalg.norm(z["features"], axis=1), 1, atol=1e-4)


def test_the_starting_state_kept_for_an_early_stop_lives_in_host_memory(device):
    payload = {"state": {"w": torch.ones(3, device=device)}, "rng": [torch.zeros(2, dtype=torch.uint8)], "n": 4}
    copy = host_copy(payload)
    assert copy["state"]["w"].device.type == "cpu" and copy["n"] == 4 and isinstance(copy["rng"], list)
    payload["state"]["w"].add_(1)
    assert copy["state"]["w"].tolist() == [1.0, 1.0, 1.0]  # a copy, not a view


# --- checked by hand on any machine ------------------------------------------------------------------------------

def test_the_gpu_memory_check_refuses_an_impossible_run_and_keeps_images_on_the_host():
    n = 200_000
    method = METHODS["npid"](Backbone("resnet18_cifar", 224), n)
    plan = plan_training_memory(method, n, 224, 256, amp=True)
    assert plan.parts["bank logits"] == 4 * 256 * n * 4 and plan.parts["state"] > n * 128 * 4  # the bank
    assert plan.images == n * 3 * 224 * 224
    with pytest.raises(ConfigError, match=r"needs about .* GiB on cuda .* but 4\.0 GiB are free; lower batch_size, "
                                          r"use bank_dtype=float16"):
        check_device_memory(plan, torch.device("cuda"), free=4 * GiB)
    roomy = plan.without_images + plan.images // 2  # the run fits, its images do not: they stay in host memory
    assert check_device_memory(plan, torch.device("cuda"), free=roomy) is False
    assert check_device_memory(plan, torch.device("cuda"), free=plan.without_images + plan.images) is True
    assert check_device_memory(plan, torch.device("cpu")) is True  # nothing to check on a CPU


def test_cuda_rng_of_a_checkpoint_restores_onto_this_processes_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state[0]), device)))
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(2)]  # an older checkpoint: one per visible GPU
    restore_cuda_rng(states, torch.device("cuda", 1))
    restore_cuda_rng(states, torch.device("cuda", 5))  # saved with 2 GPUs visible, resumed on the 6th of 8
    restore_cuda_rng(states[0], torch.device("cuda", 0))  # this version's checkpoints: this GPU's state alone
    restore_cuda_rng(states[0], torch.device("cpu"))  # a CPU run leaves the CUDA generator alone
    restore_cuda_rng(None, torch.device("cuda", 0))  # a checkpoint of a CPU run
    assert calls == [(1, torch.device("cuda", 1)), (1, torch.device("cuda", 5)), (0, torch.device("cuda", 0))]


def test_cuda_settings_tf32_on_and_the_autotuner_off_when_deterministic(monkeypatch):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_device(torch.device("cuda"), deterministic=False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        configure_device(torch.device("cuda"), deterministic=True)
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        torch.backends.cudnn.benchmark = True
        configure_device(torch.device("cpu"), deterministic=True)  # a CPU run changes nothing
        assert torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = flags


def test_ddp_is_told_not_to_sync_buffers_in_this_torchs_words():
    import inspect

    words = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    want = "forward_sync_buffers" if "forward_sync_buffers" in words else "broadcast_buffers"  # before torch 2.14
    assert no_buffer_sync() == {want: False}


def test_a_mid_epoch_checkpoint_of_another_devices_generator_replays_its_draws(tmp_path, monkeypatch,
                                                                                 keep_determinism_setting):
    keys = {"epochs": 1, "checkpoint_every": 2}
    cfg, hp = run_cfg(tmp_path, "pcp", name="full", min_clusters=4, vote_epochs=1, **keys)
    train(cfg, hp)
    save = trainer.save_checkpoint
    saved = []

    def keep_first(path, payload):  # the checkpoint at step 2, as a run on another device would leave it
        if payload.get("mid_epoch") and not saved:
            payload["mid_epoch"].update(augment_device="cuda", augment_generator=torch.zeros(16, dtype=torch.uint8))
            saved.append(payload["mid_epoch"]["step"])
            save(path, payload)
    monkeypatch.setattr(trainer, "save_checkpoint", keep_first)
    cfg, hp = run_cfg(tmp_path, "pcp", name="cut", min_clusters=4, vote_epochs=1, **keys)
    train(cfg, hp)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    assert saved == [2]
    (tmp_path / "cut" / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[:1]))
    train(cfg, hp, resume=True)  # the CPU generator replays 2 steps of draws: the same images as uninterrupted
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt")["state"] for name in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.isclose(read_rows(tmp_path / "full")[0]["loss"], read_rows(tmp_path / "cut")[0]["loss"])
