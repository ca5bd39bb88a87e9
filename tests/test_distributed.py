"""Data-parallel training under torchrun: two (and three) gloo processes on the CPU against one process.

One epoch on 2 ranks with global batch B must give what one process with batch B gives (within float
tolerance: the ranks sum in another order); the replicated method state (bank, labels, assignments, SCSs,
vote history) must equal the single-process state; distributed k-means must equal single-process k-means
from the same initial centroids; and a run checkpointed on 2 processes (at an epoch's end, or inside an
epoch with checkpoint_every) must resume on 1 and on 3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import read_rows, tiny_npz

from deepclust import distributed
from deepclust.checkpoint import load_checkpoint
from deepclust.cli import main
from deepclust.cluster import kmeans
from deepclust.config import ConfigError, resolve
from deepclust.train import train

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = Path(__file__).resolve().parents[1]
# ODC without dropout: its masks are drawn per rank from the global generator, so they cannot match one
# process's masks (training still runs distributed with dropout; only this comparison needs it off).
METHODS = {"npid": {}, "is": {"small_crops": 1},  # IS with a small crop: each crop's batch gathered
           "deepcluster": {"k": 4}, "odc": {"k": 4, "min_cluster": 2, "dropout": 0.0},
           "uic": {"k": 4}, "pcp": {"min_clusters": 4, "vote_epochs": 1}, "pad": {},
           # the queue from epoch 1 on, full after its first step there (Sinkhorn's sums across the ranks)
           "swav": {"prototypes": 6, "queue_length": 32, "queue_start": 0.5, "small_crops": 1},
           "deepclusterv2": {"k": 4, "heads": 2}, "sela": {"k": 4, "heads": 2}}


def layer(data: str, method: str, out: Path, **keys) -> dict:
    return {"method": method, "data": data, "test_data": data, "backbone": "convnet", "width": 8, "epochs": 2,
            "batch_size": 32, "out": str(out), "progress": False, "seed": 3, "lr_decay_at": [], "amp": False,
            "eval_every": 0, "device": "cpu", **METHODS[method], **keys}  # gloo: the CPU, even on a GPU machine


def torchrun(tmp_path: Path, nproc: int, spec: dict, timeout: float = 600) -> None:
    """The worker on ``spec`` under torchrun; a run past ``timeout`` (a hang) is killed with its workers."""
    path = tmp_path / f"spec{nproc}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(WORKER), str(path)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: torchrun and the workers it started
            proc.communicate()
            pytest.fail(f"torchrun ran past {timeout} s (a hang)")
    assert proc.returncode == 0, stderr[-4000:]


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        x, y = a[key], b[key]
        if x.is_floating_point():
            assert torch.allclose(x, y, atol=2e-4, rtol=1e-3), f"{what}: {key} differs by {(x - y).abs().max()}"
        else:
            assert torch.equal(x, y), f"{what}: {key} differs in {int((x != y).sum())} of {x.numel()} entries"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every method for 2 epochs on 2 ranks, k-means on 2 ranks, and an NPID run cut after epoch 1 on 2
    ranks, then resumed on 3 ranks; the same runs in this process (world size 1)."""
    tmp = tmp_path_factory.mktemp("dist")
    data = tiny_npz(tmp)
    torch.manual_seed(0)
    x = torch.randn(300, 8)
    x[:100] += 4
    x[100:200] -= 4
    torch.save(x, tmp / "x.pt")
    jobs = [{"config": layer(data, m, tmp / "two" / m)} for m in METHODS]
    jobs.append({"config": layer(data, "is", tmp / "two" / "vit", backbone="timm:test_vit")})  # LayerNorm, no BN
    jobs.append({"config": layer(data, "npid", tmp / "cut2", stop_after=1)})
    jobs.append({"config": layer(data, "npid", tmp / "every2", checkpoint_every=1),
                 "copy_at": [1, 2, str(tmp / "mid2")]})  # 3 steps an epoch: killed after step 2 of epoch 1
    torchrun(tmp, 2, {"train": jobs, "kmeans": {"x": str(tmp / "x.pt"), "k": 5, "iters": 10, "seed": 1,
                                                "out": str(tmp / "kmeans2.pt")}})
    for name in ("resume1", "resume3"):
        shutil.copytree(tmp / "cut2", tmp / name)
        shutil.copytree(tmp / "mid2", tmp / f"mid_{name}")
    torchrun(tmp, 3, {"train": [{"config": layer(data, "npid", tmp / name), "resume": True}
                                for name in ("resume3", "mid_resume3")]
                      + [{"config": layer(data, "swav", tmp / "three" / "swav")}]})  # 11 / 11 / 10 rows a rank
    for m in METHODS:
        train(*resolve([layer(data, m, tmp / "one" / m)]))
    train(*resolve([layer(data, "is", tmp / "one" / "vit", backbone="timm:test_vit")]))
    for name in ("resume1", "mid_resume1"):
        train(*resolve([layer(data, "npid", tmp / name)]), resume=True)
    return tmp, x


@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_equal_one_process(runs, method):
    tmp, _ = runs
    one = load_checkpoint(tmp / "one" / method / "checkpoint.pt")
    two = load_checkpoint(tmp / "two" / method / "checkpoint.pt")
    assert_same_state(one["state"], two["state"], method)  # parameters, BN statistics, bank, labels, SCSs
    losses = [[r["loss"] for r in read_rows(tmp / d / method)] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_a_timm_vit_on_two_ranks_equals_one_process(runs):
    """A BatchNorm-free trunk (timm's test ViT: LayerNorm) under torchrun: DDP alone keeps the ranks together."""
    tmp, _ = runs
    one = load_checkpoint(tmp / "one" / "vit" / "checkpoint.pt")
    two = load_checkpoint(tmp / "two" / "vit" / "checkpoint.pt")
    assert two["backbone"]["name"] == "timm:test_vit"
    assert_same_state(one["state"], two["state"], "timm:test_vit")


def test_swav_on_three_ranks_equals_one_process(runs):
    """Uneven parts of the batch and of the queue (32 rows: 11 / 11 / 10 a rank) still count each sample once in
    Sinkhorn's sums across the ranks."""
    tmp, _ = runs
    one = load_checkpoint(tmp / "one" / "swav" / "checkpoint.pt")
    three = load_checkpoint(tmp / "three" / "swav" / "checkpoint.pt")
    assert bool(one["state"]["queue.count"] == 32)  # the queue was full, so the codes used it
    assert_same_state(one["state"], three["state"], "swav on 3 ranks")


def test_distributed_kmeans_equals_single_process(runs):
    tmp, x = runs
    single = kmeans(x, 5, iters=10, seed=1)
    two = torch.load(tmp / "kmeans2.pt", weights_only=True)
    assert torch.equal(single.assignments, two["assignments"])
    assert torch.allclose(single.centroids, two["centroids"], atol=1e-5)


@pytest.mark.parametrize("name", ["resume1", "resume3"])
def test_checkpoint_of_two_ranks_resumes_on_one_and_three(runs, name):
    tmp, _ = runs
    assert load_checkpoint(tmp / "cut2" / "checkpoint.pt")["next_epoch"] == 1
    resumed = load_checkpoint(tmp / name / "checkpoint.pt")
    assert resumed["next_epoch"] == 2
    assert_same_state(load_checkpoint(tmp / "one" / "npid" / "checkpoint.pt")["state"], resumed["state"], name)
    assert [r["global_epoch"] for r in read_rows(tmp / name)] == [0, 1]


@pytest.mark.parametrize("name", ["mid_resume1", "mid_resume3"])
def test_checkpoint_inside_an_epoch_on_two_ranks_resumes_on_one_and_three(runs, name):
    tmp, _ = runs
    taken = load_checkpoint(tmp / "mid2" / "checkpoint.pt")
    assert taken["next_epoch"] == 1 and taken["mid_epoch"]["step"] == 2
    one = tmp / "one" / "npid"
    for run in ("every2", name):  # checkpoints inside epochs change nothing; the resumed run ends as one process
        assert_same_state(load_checkpoint(one / "checkpoint.pt")["state"],
                          load_checkpoint(tmp / run / "checkpoint.pt")["state"], run)
        assert [r["loss"] for r in read_rows(tmp / run)] == pytest.approx([r["loss"] for r in read_rows(one)],
                                                                           rel=1e-3)


@pytest.mark.parametrize("labels_drift", [False, True], ids=["sums", "labels"])
def test_odc_replicas_stay_bit_identical_when_one_ranks_centroid_sums_drift(tmp_path, labels_drift):
    """CUDA's index_add_ may sum in another order on each rank: rank 1's centroid sums are nudged one ulp, a
    small-cluster repair is forced at every refresh (each step), and after the epoch both replicas of ODC's
    state (centroids, labels, weights, memory, parameters) must be bit-identical: rank 0's refresh wins.
    ``labels``: rank 1 also has one more small cluster than rank 0 (labels that drifted apart), so the ranks
    repair a different number of clusters: a repair that made collectives would hang (the timeout)."""
    data = tiny_npz(tmp_path)
    out = tmp_path / "states"
    job = {"config": layer(data, "odc", tmp_path / "run", epochs=1, centroid_interval=1),
           "odc_drift": {"out": str(out), "labels_drift": labels_drift}}
    torchrun(tmp_path, 2, {"train": [job]}, timeout=300)
    ranks = [torch.load(out / f"rank{r}_epoch0.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["repairs"] >= 3 and ranks[1]["repairs"] >= 3  # one repair at each of the 3 steps at least
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, f"the replicas differ in {differ}"


def batchnorm_reference(case: dict) -> dict:
    """torch's BatchNorm over the whole batch in one process, in float64 (the exact statistics)."""
    x = case["x"].double().requires_grad_()
    bn = (nn.BatchNorm2d if x.dim() == 4 else nn.BatchNorm1d)(x.shape[1], momentum=0.3).double().train()
    with torch.no_grad():
        bn.weight.copy_(case["weight"])
        bn.bias.copy_(case["bias"])
    y = bn(x)
    y.backward(case["grad"].double())
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var}


def test_global_batchnorm_makes_one_all_reduce_each_way_and_equals_one_process(tmp_path):
    """GlobalBatchNorm on 2 gloo ranks: one all_reduce in forward and one in backward per layer, and the output,
    input gradient, parameter gradients (summed over ranks, as DDP does) and running statistics equal torch's
    BatchNorm over the whole batch in one process within 1e-5 (relative and absolute; float32 against float64;
    3.5e-6 measured, torch's own float32 BatchNorm is 6e-6 off here).
    Cases: an uneven split of inputs whose mean is 25 times their spread (single-pass float32 moments would
    cancel), (N, C) input, and a rank with no rows (PAD's forward of its isolated samples)."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape, scale, offset, rows in (((12, 3, 4, 4), 2.0, 50.0, [(0, 7), (7, 12)]),
                                       ((10, 5), 0.5, -20.0, [(0, 5), (5, 10)]),
                                       ((8, 3, 2, 2), 1.0, 1.0, [(0, 8), (8, 8)])):
        channels = shape[1]
        cases.append({"x": torch.randn(shape, generator=g) * scale + offset, "grad": torch.randn(shape, generator=g),
                      "weight": 1 + torch.rand(channels, generator=g), "bias": torch.randn(channels, generator=g),
                      "rows": rows})
    torch.save(cases, tmp_path / "cases.pt")
    torchrun(tmp_path, 2, {"batchnorm": {"cases": str(tmp_path / "cases.pt"), "out": str(tmp_path)}})
    ranks = [torch.load(tmp_path / f"bn_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for i, case in enumerate(cases):
        want = batchnorm_reference(case)
        got = [r[i] for r in ranks]
        assert [(r["forward"], r["backward"]) for r in got] == [(1, 1), (1, 1)], f"case {i}: collectives"
        close = {"rtol": 1e-5, "atol": 1e-5, "msg": lambda m, i=i: f"case {i}: {m}"}
        for key in ("y", "x_grad"):
            torch.testing.assert_close(torch.cat([r[key] for r in got]).double(), want[key], **close)
        for key in ("weight_grad", "bias_grad"):
            torch.testing.assert_close((got[0][key] + got[1][key]).double(), want[key], **close)
        for r in got:
            for key in ("running_mean", "running_var"):
                torch.testing.assert_close(r[key].double(), want[key], **close)


@pytest.mark.parametrize("visible", [0, 1])
def test_nproc_above_the_visible_gpus_is_a_clear_config_error(tmp_path, monkeypatch, capsys, visible):
    """--nproc 2 on device=cuda with fewer GPUs visible: exit 2 naming the count and the fix, before torchrun
    starts (torch.cuda.device_count patched: the only way to see 1 GPU here); and a rank that torchrun started
    itself refuses the same way before torch.cuda.set_device."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    started = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: started.append(a) or 0)
    data = tiny_npz(tmp_path)
    code = main(["train", "--method", "npid", "--data", data, "--out", str(tmp_path / "run"), "--device", "cuda",
                 "--nproc", "2"])
    err = capsys.readouterr().err
    assert code == 2 and not started
    assert "2 processes on this machine need a GPU each" in err
    assert ("no GPU is visible" if visible == 0 else "only 1 GPU is visible") in err
    assert ("--nproc 1 or fewer, or device=cpu" if visible else "run with device=cpu") in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="2 processes on this machine need a GPU each"):
        distributed.initialise(torch.device("cuda"))
