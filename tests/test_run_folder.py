"""An --out folder that holds a run: refused without --resume or --overwrite (and left byte for byte as it was),
moved aside by --overwrite, continued by --resume, or started by it when there is no checkpoint yet (a SIGKILL
in epoch 0), equal to an uninterrupted run; a resume with another config names the keys that differ."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import read_rows, run_cfg, tiny_npz

from deepclust.checkpoint import CheckpointError, load_checkpoint
from deepclust.cli import main
from deepclust.safety import LOCK_NAME
from deepclust.train import train

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/deepclust-run-folder/none.npz"
TIMINGS = ("time", "targets_time")
KEYS = ["--method", "npid", "--backbone", "convnet", "width=8", "batch_size=32", "progress=false", "device=cpu",
        "threads=1", "seed=3", "lr_decay_at=[]", "deterministic=true"]


def train_argv(data: str, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["train", *KEYS, "--epochs", str(epochs), "--data", data, "--test-data", data, "--out", str(out), *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def all_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_run(want: Path, have: Path) -> None:
    """Same metrics but timings (the untrained baseline row included), same weights, buffers and momentum."""
    assert untimed(all_rows(have)) == untimed(all_rows(want))
    a, b = load_checkpoint(want / "checkpoint.pt"), load_checkpoint(have / "checkpoint.pt")
    assert a["next_epoch"] == b["next_epoch"]
    assert a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    momentum = [[s["momentum_buffer"] for s in p["optimizer"]["state"].values()] for p in (a, b)]
    assert len(momentum[0]) > 0 and all(torch.equal(x, y) for x, y in zip(*momentum, strict=True))


@pytest.fixture
def finished(tmp_path, capsys, keep_determinism_setting) -> tuple[str, Path]:
    """(data, out) of a finished one-epoch NPID run on the tiny data, made by `deepclust train`."""
    data, out = tiny_npz(tmp_path), tmp_path / "run"
    assert main(train_argv(data, out)) == 0
    capsys.readouterr()
    return data, out


def test_a_second_train_into_a_finished_run_exits_2_and_changes_nothing(finished, capsys):
    data, out = finished
    before = snapshot(out)
    knn = read_rows(out)[-1]["knn_top1"]
    assert main(train_argv(data, out)) == 2  # the same command again, by mistake
    err = capsys.readouterr().err
    assert f"{out} already holds a run (npid, 1 of 1 epochs done, last kNN top-1 {knn:.2f}%)" in err, err
    assert "--resume" in err and f"--overwrite (which moves the old run aside to {out}.1" in err
    assert snapshot(out) == before  # checkpoint.pt, metrics.jsonl and config.yaml byte for byte, no lock left
    assert not (out / LOCK_NAME).exists() and not Path(f"{out}.1").exists()
    # refused before any data is read: data that does not exist is never looked at
    assert main(train_argv(MISSING, out)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and MISSING not in err
    assert snapshot(out) == before


def test_a_folder_with_only_a_metrics_log_is_a_run_too_and_an_empty_one_is_not(tmp_path, capsys,
                                                                                keep_determinism_setting):
    data, out = tiny_npz(tmp_path), tmp_path / "killed"
    out.mkdir()
    # what a run killed in epoch 0 leaves: its untrained baseline, no checkpoint
    baseline = {"round": 0, "epoch": -1, "global_epoch": -1, "knn_top1": 25.0, "untrained": True}
    (out / "metrics.jsonl").write_text(json.dumps(baseline) + "\n")
    before = snapshot(out)
    assert main(train_argv(data, out)) == 2
    err = capsys.readouterr().err
    assert "0 epochs logged, no checkpoint yet, untrained kNN top-1 25.00%" in err, err
    assert snapshot(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")  # an empty log: nothing was measured, nothing to lose
    assert main(train_argv(data, empty)) == 0
    assert load_checkpoint(empty / "checkpoint.pt")["next_epoch"] == 1


def test_overwrite_moves_the_old_run_aside_and_starts_again(finished, capsys, caplog):
    data, out = finished
    first = snapshot(out)
    assert main(train_argv(data, out, "--overwrite", "seed=4")) == 0
    aside = Path(f"{out}.1")
    assert snapshot(aside) == first  # the old run, byte for byte, beside the new one
    assert f"moved the run that was in {out} aside to {aside}" in caplog.text
    assert load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 4
    assert [r["global_epoch"] for r in all_rows(out)] == [-1, 0]  # a fresh log: baseline and its one epoch
    second = snapshot(out)
    assert main(train_argv(data, out, "--overwrite")) == 0  # again: the next free name, nothing replaced
    assert snapshot(aside) == first and snapshot(Path(f"{out}.2")) == second
    assert load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 3
    capsys.readouterr()
    current = snapshot(out)
    assert main(train_argv(data, out, "--overwrite", "--resume")) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert snapshot(out) == current and not Path(f"{out}.3").exists()


def test_resume_on_a_finished_run_reports_and_changes_nothing(finished, capsys):
    data, out = finished
    before = snapshot(out)
    assert main(train_argv(data, out, "--resume")) == 0
    assert "done: npid" in capsys.readouterr().out
    after = snapshot(out)
    assert {k: after[k] for k in ("checkpoint.pt", "metrics.jsonl")} == \
        {k: before[k] for k in ("checkpoint.pt", "metrics.jsonl")}


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_resume_without_a_checkpoint_trains_and_equals_a_run_without_resume(tmp_path, caplog, folder,
                                                                             keep_determinism_setting):
    cfg, hp = run_cfg(tmp_path, "npid", name="plain")
    train(cfg, hp)
    if folder == "empty":
        (tmp_path / "resumed").mkdir()
    cfg, hp = run_cfg(tmp_path, "npid", name="resumed")
    caplog.set_level(logging.INFO, logger="deepclust")
    train(cfg, hp, resume=True)
    assert "has no checkpoint yet" in caplog.text and "starting the run from the beginning" in caplog.text
    assert [r["global_epoch"] for r in read_rows(tmp_path / "resumed")] == [0, 1]
    assert_same_run(tmp_path / "plain", tmp_path / "resumed")


def test_sigkill_in_epoch_0_then_the_same_command_with_resume_equals_an_uninterrupted_run(
        tmp_path, capsys, keep_determinism_setting):
    # 1024 images of 32 px in 64 batches: epoch 0 takes about half a second, a 2 ms poll kills inside it
    data = str(Path(tiny_npz(tmp_path, n=1024, size=32)).rename(tmp_path / "data.npz"))
    killed, full = tmp_path / "killed", tmp_path / "full"
    argv = train_argv(data, killed, "batch_size=16", epochs=2)
    proc = subprocess.Popen([sys.executable, "-m", "deepclust", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        metrics = killed / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().endswith("\n")):  # the untrained row: epoch 0 starts
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoint.pt").exists(), "the kill landed after epoch 0's checkpoint"
    assert [r.get("untrained") for r in all_rows(killed)] == [True] and (killed / LOCK_NAME).exists()
    # the requeued job: the same command plus --resume (it starts again from the beginning)
    assert main([*argv, "--resume"]) == 0
    assert main(train_argv(data, full, "batch_size=16", epochs=2)) == 0  # the uninterrupted run
    capsys.readouterr()
    assert [r["global_epoch"] for r in all_rows(killed)] == [-1, 0, 1]
    assert_same_run(full, killed)


def test_resume_with_another_config_names_the_keys_and_changes_nothing(tmp_path, keep_determinism_setting):
    cfg, hp = run_cfg(tmp_path, "npid", name="cut", stop_after=1)
    train(cfg, hp)
    out = tmp_path / "cut"
    before = snapshot(out)
    cfg, hp = run_cfg(tmp_path, "npid", name="cut", lr=0.1, tau=0.2, epochs=3)
    with pytest.raises(CheckpointError) as err:
        train(cfg, hp, resume=True)
    message = str(err.value)
    for diff in ("lr: 0.03 in the checkpoint, 0.1 now", "tau: 0.1 in the checkpoint, 0.2 now",
                 "epochs: 2 in the checkpoint, 3 now"):
        assert diff in message, message
    assert "stop_after:" not in message and "seed:" not in message  # only the keys that differ
    assert snapshot(out) == before
    # where and how often: a later stop, other threads, other logging and checkpoints may change
    cfg, hp = run_cfg(tmp_path, "npid", name="cut", eval_every=2, threads=1, checkpoint_every=2, progress=True)
    train(cfg, hp, resume=True)
    assert load_checkpoint(out / "checkpoint.pt")["next_epoch"] == 2


def test_resume_with_another_config_exits_2_from_the_command_line(finished, capsys):
    data, out = finished
    before = snapshot(out)
    assert main(train_argv(data, out, "--resume", "momentum=0.5")) == 2
    assert "momentum: 0.9 in the checkpoint, 0.5 now" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_cluster_count_derived_from_the_data_resumes_and_an_explicit_one_must_match(tmp_path,
                                                                                       keep_determinism_setting):
    # UIC records k = N / 50 (here 2) in its config; the same command (k none) resumes it
    cfg, hp = run_cfg(tmp_path, "uic", name="auto", stop_after=1)
    train(cfg, hp)
    assert load_checkpoint(tmp_path / "auto" / "checkpoint.pt")["config"]["k"] == 2
    cfg, hp = run_cfg(tmp_path, "uic", name="auto")
    train(cfg, hp, resume=True)
    assert load_checkpoint(tmp_path / "auto" / "checkpoint.pt")["next_epoch"] == 2
    # an explicit k = 3: leaving k to the data now would build 2 classes, so it is named
    cfg, hp = run_cfg(tmp_path, "uic", name="three", k=3, stop_after=1)
    train(cfg, hp)
    cfg, hp = run_cfg(tmp_path, "uic", name="three")
    with pytest.raises(CheckpointError, match="k: 3 in the checkpoint, None now"):
        train(cfg, hp, resume=True)
