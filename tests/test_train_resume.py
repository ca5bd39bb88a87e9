"""A run killed mid-epoch and resumed equals the uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import read_rows, run_cfg

from deepclust import train as trainer
from deepclust.checkpoint import load_checkpoint
from deepclust.config import TrainConfig, resolve
from deepclust.methods import METHODS
from deepclust.train import epoch_seed, lr_at, train, truncate_metrics

# All 1438 training digits with a width-8 ConvNet: about a second per epoch, long enough to kill one
# reliably from a 5 ms polling loop. One intra-op thread (as conftest sets for this process), so the killed
# subprocess and the in-process runs compute bit-identical floats.
CONFIG = {"method": "npid", "data": "digits", "backbone": "convnet", "width": 8, "epochs": 3, "batch_size": 64,
          "deterministic": True, "eval_every": 1, "progress": False, "seed": 1}

SCRIPT = f"""
import sys
import torch
torch.set_num_threads(1)
from deepclust.config import resolve
from deepclust.train import train
cfg, hp = resolve([{{**{CONFIG!r}, "out": sys.argv[1]}}])
train(cfg, hp)
"""


def run_in_process(out: Path, resume: bool = False) -> None:
    cfg, hp = resolve([{**CONFIG, "out": str(out)}])
    train(cfg, hp, resume=resume)


def kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, report: dict) -> None:
    """SIGKILL ``proc`` as soon as the checkpoint of epoch 0 appears, i.e. while epoch 1 runs."""
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            report["error"] = f"run ended or stalled before its first checkpoint (rc {proc.poll()})"
            proc.kill()
            return
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    report["killed"] = True


def all_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]



def test_resume_after_kill_mid_epoch_equals_uninterrupted(tmp_path, keep_determinism_setting):
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen([sys.executable, "-c", SCRIPT, str(killed)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    report: dict = {}
    killer = threading.Thread(target=kill_after_first_checkpoint, args=(victim, killed, report))
    killer.start()
    try:
        run_in_process(full)  # the uninterrupted reference, while the victim starts up
        killer.join(timeout=300)
        output, _ = victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert report.get("killed"), (report, output[-3000:])
    assert victim.returncode == -signal.SIGKILL
    # killed during epoch 1: one metrics row, a checkpoint that resumes at epoch 1
    assert len(read_rows(killed)) == 1, "the kill did not land in epoch 1"
    assert load_checkpoint(killed / "checkpoint.pt")["next_epoch"] == 1

    # a crash between writing a metrics row and writing its checkpoint leaves a stale row: resume drops it
    stale = {**read_rows(killed)[0], "epoch": 1, "global_epoch": 1, "loss": 123.0, "knn_top1": 99.9}
    with open(killed / "metrics.jsonl", "a") as f:
        f.write(json.dumps(stale) + "\n")

    run_in_process(killed, resume=True)

    expected, got = read_rows(full), read_rows(killed)
    # the untrained network's kNN is measured once, before epoch 0, and survives the resume
    baseline = [r for r in all_rows(full) if r.get("untrained")]
    assert len(baseline) == 1 and baseline[0]["global_epoch"] == -1 and 0 < baseline[0]["knn_top1"] < 100
    assert [r for r in all_rows(killed) if r.get("untrained")] == baseline
    assert [r["global_epoch"] for r in expected] == [0, 1, 2]
    assert [r["global_epoch"] for r in got] == [0, 1, 2]
    assert [r["lr"] for r in expected] == pytest.approx([0.03, 0.03, 0.003])
    for want, have in zip(expected, got, strict=True):
        for key in ("round", "epoch", "loss", "lr", "knn_top1"):
            assert have[key] == want[key], (want["global_epoch"], key, have[key], want[key])
    assert all(r["loss"] != 123.0 for r in got)

    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(killed / "checkpoint.pt")
    assert a["next_epoch"] == b["next_epoch"] == 3
    assert a["state"].keys() == b["state"].keys()
    for key, tensor in a["state"].items():
        assert torch.equal(tensor, b["state"][key]), key
    assert "bank.features" in a["state"]
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momentum_a) == len(momentum_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_truncate_metrics_drops_rows_the_checkpoint_does_not_hold(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"global_epoch": e, "loss": float(e)}) + "\n" for e in range(4)) + "\n")
    truncate_metrics(path, 2)
    assert [json.loads(line)["global_epoch"] for line in path.read_text().splitlines()] == [0, 1]
    truncate_metrics(path, 0)
    assert path.read_text() == ""
    truncate_metrics(tmp_path / "absent.jsonl", 3)  # no file: nothing to do, no error
    assert not (tmp_path / "absent.jsonl").exists()


def test_lr_schedule_steps_within_each_round():
    cfg = TrainConfig(epochs=10, lr=0.1, lr_decay_at=[0.6, 0.8], lr_decay=0.1)
    assert [lr_at(cfg, e) for e in range(10)] == pytest.approx([0.1] * 6 + [0.01] * 2 + [0.001] * 2)
    cfg = TrainConfig(epochs=3, lr=0.03)  # ceil(1.8) = 2, ceil(2.4) = 3
    assert [lr_at(cfg, e) for e in range(3)] == pytest.approx([0.03, 0.03, 0.003])


def test_linear_and_cosine_schedules_fall_from_lr_over_a_round_and_ignore_the_steps():
    linear = TrainConfig(epochs=4, lr=0.1, lr_schedule="linear", lr_decay_at=[0.5])
    assert [lr_at(linear, e) for e in range(4)] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    cosine = TrainConfig(epochs=4, lr=0.1, lr_schedule="cosine")
    half = 0.05 * (1 + 2**-0.5)  # 0.1 * (1 + cos(pi / 4)) / 2
    assert [lr_at(cosine, e) for e in range(4)] == pytest.approx([0.1, half, 0.05, 0.1 - half])


def test_epoch_seeds_are_distinct():
    seeds = {epoch_seed(s, r, e) for s in range(3) for r in range(5) for e in range(300)}
    assert len(seeds) == 3 * 5 * 300


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].trains])
def test_a_checkpoint_inside_an_epoch_resumes_where_it_was_taken(tmp_path, method, monkeypatch,
                                                                  keep_determinism_setting):
    """checkpoint_every=1 on 96 images in batches of 32 (3 steps an epoch): the run's checkpoint after step 1
    of epoch 1, left as a killed process would leave it, resumes to the end of the run without checkpoints
    inside epochs, state and metrics equal (so the checkpoints themselves change nothing either)."""
    keys = {"epochs": 3, "lr_decay_at": [0.5], "eval_every": 1}
    if method == "and":
        keys = {**keys, "epochs": 2, "rounds": 2}  # the cut lands in round 0; its anchor round follows
    cfg, hp = run_cfg(tmp_path, method, name="full", **keys)
    train(cfg, hp)
    killed = tmp_path / "killed"
    save = trainer.save_checkpoint

    def save_and_keep(path, payload):  # what the folder holds right after this save, had the run died then
        save(path, payload)
        mid = payload.get("mid_epoch")
        if payload["next_epoch"] == 1 and mid is not None and mid["step"] == 1 and not killed.exists():
            shutil.copytree(path.parent, killed, ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setattr(trainer, "save_checkpoint", save_and_keep)
    cfg, hp = run_cfg(tmp_path, method, name="every", checkpoint_every=1, **keys)
    train(cfg, hp)
    monkeypatch.undo()
    taken = load_checkpoint(killed / "checkpoint.pt")
    assert taken["next_epoch"] == 1 and taken["mid_epoch"]["step"] == 1
    assert [r["global_epoch"] for r in read_rows(killed)] == [0]
    cfg, hp = run_cfg(tmp_path, method, name="killed", **keys)
    train(cfg, hp, resume=True)
    drop = ("time", "targets_time", "cluster_time", "graph_time", "scs_time")
    for run in ("every", "killed"):
        want, have = read_rows(tmp_path / "full"), read_rows(tmp_path / run)
        assert [{k: v for k, v in r.items() if k not in drop} for r in have] == \
            [{k: v for k, v in r.items() if k not in drop} for r in want], run
        a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("full", run))
        assert "mid_epoch" not in b and a["next_epoch"] == b["next_epoch"]
        assert a["state"].keys() == b["state"].keys()
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]), run


def test_checkpoint_every_must_be_positive():
    from deepclust.config import ConfigError
    with pytest.raises(ConfigError, match="checkpoint_every must be at least 1"):
        resolve([{**CONFIG, "checkpoint_every": 0}])
