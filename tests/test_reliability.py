"""Faults a long run meets, each with its exact outcome: SIGTERM / SIGINT to a real training process, a NaN
loss, a full disk while checkpointing, a torn metrics line, a damaged checkpoint, two runs in one folder."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_rows, run_cfg
from test_train_resume import CONFIG, all_rows, run_in_process

from deepclust.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepclust.cli import main
from deepclust.data import DataError, load_data
from deepclust.methods import METHODS
from deepclust.runtime import available_memory
from deepclust.safety import LOCK_NAME, LockError, NumericalError, RunError, disk_full_is_a_run_error, hold_folder
from deepclust.train import train

ROOT = Path(__file__).resolve().parents[1]


def start_training(out: Path, *extra: str) -> subprocess.Popen:
    """`deepclust train` of test_train_resume's CONFIG in a subprocess (about a second an epoch), in a new
    session (process group) as a batch job's step is."""
    keys = [f"{k}={v}" for k, v in CONFIG.items()]
    return subprocess.Popen([sys.executable, "-m", "deepclust.cli", "train", f"out={out}", *keys, *extra], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path} (rc {proc.poll()}): {proc.communicate()[0][-3000:]}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must end as."""
    before = torch.are_deterministic_algorithms_enabled()
    out = tmp_path_factory.mktemp("reference")
    run_in_process(out)
    torch.use_deterministic_algorithms(before)
    return out


def assert_same_run(want: Path, have: Path) -> None:
    """Same metrics (timings aside), same untrained baseline row, same final weights, buffers and momentum."""
    assert [r for r in all_rows(have) if r.get("untrained")] == [r for r in all_rows(want) if r.get("untrained")]
    keys = ("round", "epoch", "global_epoch", "loss", "lr", "knn_top1")
    assert [{k: r[k] for k in keys} for r in read_rows(have)] == [{k: r[k] for k in keys} for r in read_rows(want)]
    a, b = load_checkpoint(want / "checkpoint.pt"), load_checkpoint(have / "checkpoint.pt")
    assert a["next_epoch"] == b["next_epoch"] == 3
    assert a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    momentum = [[s["momentum_buffer"] for s in p["optimizer"]["state"].values()] for p in (a, b)]
    assert all(torch.equal(x, y) for x, y in zip(*momentum, strict=True))


@pytest.mark.parametrize("target", ["process", "group_with_loader_workers"])
def test_sigterm_mid_epoch_stops_after_the_step_and_resume_equals_uninterrupted(tmp_path, reference, target,
                                                                                keep_determinism_setting):
    out = tmp_path / "run"
    if target == "process":
        proc = start_training(out)
        wait_for(out / "checkpoint.pt", proc)  # epoch 0 is saved: epoch 1 is running
        proc.send_signal(signal.SIGTERM)
    else:  # as SLURM's scancel and a terminal do: every process of the group, DataLoader workers too
        proc = start_training(out, "num_workers=1")
        wait_for(out / "checkpoint.pt", proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        while proc.poll() is None and not children.read_text().strip():  # until epoch 1's loader worker runs
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert re.search(r"stopped by SIGTERM at (round 0 epoch 1 step \d+ of npid|the end of epoch 0)\. "
                     rf"{re.escape(str(out))}/checkpoint.pt resumes at epoch 1", output), output[-3000:]
    assert "run the same command with --resume" in output and "Traceback" not in output
    assert load_checkpoint(out / "checkpoint.pt")["next_epoch"] == 1
    assert [r["global_epoch"] for r in read_rows(out)] == [0]  # the interrupted epoch left no row
    assert not (out / LOCK_NAME).exists()
    run_in_process(out, resume=True)
    assert_same_run(reference, out)


def test_sigterm_with_checkpoint_every_saves_the_step_it_stopped_at_and_resume_equals_uninterrupted(
        tmp_path, reference, keep_determinism_setting):
    out = tmp_path / "run"
    proc = start_training(out, "checkpoint_every=5")
    wait_for(out / "checkpoint.pt", proc)  # 23 steps an epoch: the first is step 5 of epoch 0
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    found = re.search(rf"stopped by SIGTERM at round 0 epoch (\d) step (\d+) of npid\. {re.escape(str(out))}"
                      r"/checkpoint.pt resumes at epoch (\d), step (\d+) \(where it stopped\)", output)
    assert found, output[-3000:]
    epoch, step, resume_epoch, resume_step = map(int, found.groups())
    assert (resume_epoch, resume_step) == (epoch, step + 1)
    saved = load_checkpoint(out / "checkpoint.pt")
    assert (saved["next_epoch"], saved["mid_epoch"]["step"]) == (epoch, step + 1)
    run_in_process(out, resume=True)  # without checkpoint_every: the checkpoint says where to go on
    assert_same_run(reference, out)


def test_sigint_in_the_first_epoch_saves_the_initial_state_and_resume_equals_uninterrupted(
        tmp_path, reference, keep_determinism_setting):
    out = tmp_path / "run"
    proc = start_training(out)
    wait_for(out / "metrics.jsonl", proc)  # the untrained baseline is written: epoch 0 starts
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "stopped by SIGINT at round 0 epoch 0 step" in output, output[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["next_epoch"] == 0  # no epoch finished: the state it started from
    assert read_rows(out) == [] and len(all_rows(out)) == 1  # only the untrained baseline
    run_in_process(out, resume=True)
    assert_same_run(reference, out)  # and the baseline row is not written twice


def test_a_live_run_holds_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys, caplog, tiny_train_args):
    out = tmp_path / "run"
    proc = start_training(out)
    try:
        wait_for(out / LOCK_NAME, proc)
        rc = main(["train", "--method", "npid", "--out", str(out), *tiny_train_args])
        err = capsys.readouterr().err
        assert rc == 2
        assert f"{out} is held by a live run (pid {proc.pid} on " in err and "use another --out" in err
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid  # the holder's lock is untouched
    finally:
        proc.kill()  # SIGKILL: no clean-up, the lock stays behind
        proc.communicate(timeout=60)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid
    # the dead run may have logged its untrained baseline: its folder then holds a run, set aside by --overwrite
    rc = main(["train", "--method", "npid", "--out", str(out), "--overwrite", *tiny_train_args])
    assert rc == 0, capsys.readouterr().err
    assert (f"taking over the lock {out}/{LOCK_NAME} left by a run that ended without removing it "
            f"({{'pid': {proc.pid}, ") in caplog.text
    assert not (out / LOCK_NAME).exists()
    assert load_checkpoint(out / "checkpoint.pt")["next_epoch"] == 1


def test_lock_of_another_host_is_refused_and_unheld_ones_taken_over(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": "node-17", "since": "2026-01-01 00:00:00"}))
    with pytest.raises(LockError, match=rf"held by a run on host node-17 \(pid 1, .* delete {re.escape(str(lock))}"):
        with hold_folder(tmp_path):
            pass
    # a live pid of this host that holds no flock (a pid reused after a reboot) does not hold the folder
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "2026-01-01"}))
    with hold_folder(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(LockError, match=f"is held by a live run \\(pid {os.getpid()} on "):
            with hold_folder(tmp_path):  # the holder is this very process: refused all the same
                pass
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    lock.write_text('{"pid": 12')  # torn by a crash while it was written
    with hold_folder(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def nan_npid(nan_at_call: int):
    """NPID whose loss is NaN at the ``nan_at_call``-th step of the run (1-based): a forced numerical fault."""

    class NanNPID(METHODS["npid"]):
        name = "nan_npid"

        def loss(self, batch):
            loss, outputs = super().loss(batch)
            self.calls = getattr(self, "calls", 0) + 1
            return (loss * math.nan if self.calls == nan_at_call else loss), outputs

    return NanNPID


def test_a_nan_loss_stops_the_run_naming_where_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys,
                                                                             keep_determinism_setting):
    # 96 images in batches of 32: 3 steps an epoch, so the 5th step is epoch 1's step 1
    monkeypatch.setitem(METHODS, "nan_npid", nan_npid(5))
    cfg, _ = run_cfg(tmp_path, "nan_npid", name="nan")
    keys = [f"{k}={v}" for k, v in vars(cfg).items() if v is not None]
    rc = main(["train", *keys])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert (f"non-finite loss (nan) at round 0 epoch 1 step 1 of nan_npid; the last good checkpoint "
            f"{cfg.out}/checkpoint.pt is kept. Lower lr, or pass nan_policy=skip") in err
    # the kept checkpoint is exactly epoch 0's: equal to a run that stopped there
    monkeypatch.setitem(METHODS, "nan_npid", nan_npid(0))
    cfg, hp = run_cfg(tmp_path, "nan_npid", name="clean", stop_after=1)
    train(cfg, hp)
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("nan", "clean"))
    assert a["next_epoch"] == b["next_epoch"] == 1
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert [r["global_epoch"] for r in read_rows(tmp_path / "nan")] == [0]


def test_a_nan_loss_at_the_last_step_of_the_first_epoch_is_caught_before_any_checkpoint(tmp_path, monkeypatch,
                                                                                         keep_determinism_setting):
    monkeypatch.setitem(METHODS, "nan_npid", nan_npid(3))  # epoch 0's last step: found by the end-of-epoch check
    cfg, hp = run_cfg(tmp_path, "nan_npid")
    with pytest.raises(NumericalError, match=r"^non-finite loss \(nan\) at round 0 epoch 0 step 2 of nan_npid; no "
                                             "checkpoint was written"):
        train(cfg, hp)
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and read_rows(tmp_path / "run") == []
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_nan_policy_skip_skips_the_step_and_counts_it(tmp_path, monkeypatch, keep_determinism_setting):
    monkeypatch.setitem(METHODS, "nan_npid", nan_npid(5))
    cfg, hp = run_cfg(tmp_path, "nan_npid", nan_policy="skip")
    train(cfg, hp)
    got = read_rows(tmp_path / "run")
    assert [r["skipped_steps"] for r in got] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in got)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, keep_determinism_setting):
    cfg, hp = run_cfg(tmp_path, "npid", name="full")
    train(cfg, hp)
    cfg, hp = run_cfg(tmp_path, "npid", name="cut", stop_after=1)
    train(cfg, hp)
    out = tmp_path / "cut"
    before = (out / "checkpoint.pt").read_bytes()
    # every write to /dev/full fails with ENOSPC, as on a full filesystem: epoch 1's checkpoint cannot be written
    (out / "checkpoint.pt.tmp").symlink_to("/dev/full")
    cfg, hp = run_cfg(tmp_path, "npid", name="cut")
    with pytest.raises(CheckpointError) as err:
        train(cfg, hp, resume=True)
    assert str(err.value).startswith(f"the disk is full while writing {out}/checkpoint.pt.tmp ([Errno 28] No space "
                                     "left on device); the previous checkpoint.pt is intact. Free space under ")
    assert str(err.value).endswith("and run again with --resume")
    assert (out / "checkpoint.pt").read_bytes() == before and not os.path.lexists(out / "checkpoint.pt.tmp")
    assert not (out / LOCK_NAME).exists()
    # the same full disk can tear the last metrics line: resume drops it (and epoch 1's row, not checkpointed)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"round": 0, "epoch": 2, "glob')
    train(cfg, hp, resume=True)
    drop = ("time", "targets_time")
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_rows(out)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_rows(tmp_path / "full")]
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt")["state"] for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_checkpoint_is_a_clear_error_not_a_traceback(tmp_path, capsys, trained_checkpoint, damage):
    path = tmp_path / "checkpoint.pt"
    data = bytearray(trained_checkpoint.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:  # one bit in the middle of the tensor data: torch.load alone reads it without complaint
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    for argv in (["eval", "--checkpoint", path, "--data", "digits"],
                 ["train", "--method", "npid", "--out", tmp_path, "--resume"]):
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err
        assert f"{path} is truncated or corrupted" in err and "restore a good copy, or delete it" in err
    with pytest.raises(CheckpointError, match="digest" if damage == "flipped" else "central directory"):
        load_checkpoint(path)


def test_a_checkpoint_records_versions_and_warns_on_a_mismatch(tmp_path, monkeypatch, caplog):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"method": "npid", "x": torch.arange(3)})
    assert load_checkpoint(path)["versions"] == {"deepclust": "0.1.0", "torch": str(torch.__version__)}
    assert "was written by" not in caplog.text
    monkeypatch.setattr("deepclust.checkpoint.__version__", "0.0.9")
    save_checkpoint(path, {"method": "npid", "x": torch.arange(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))
    assert f"{path} was written by deepclust 0.0.9, torch {torch.__version__}, this is deepclust 0.1.0" in caplog.text


def image_folder(root: Path, count: int = 4, size: int = 16) -> Path:
    from PIL import Image

    root.mkdir()
    for i in range(count):
        Image.new("RGB", (size, size), (40 * i, 0, 0)).save(root / f"{i}.png")
    return root


def test_a_dataset_over_the_available_memory_fails_before_decoding_with_the_estimate(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "images")  # 4 images of 16x16: 4 x 3 x 16 x 16 = 3072 bytes decoded
    monkeypatch.setattr("deepclust.data.pixels.available_memory", lambda: 3071)
    with pytest.raises(DataError, match=re.escape(
            f"{folder}: 4 images of 16x16 need about 0.00 GiB (N x 3 x S x S bytes decoded), but 0.00 GiB of "
            "memory are available; pass subset=N or a smaller image_size, or decode the data once into a cache "
            "read from disk: `deepclust prepare SOURCE --out CACHE --size S`, then --data CACHE")):
        load_data(str(folder))
    monkeypatch.setattr("deepclust.data.pixels.available_memory", lambda: 3072)
    assert load_data(str(folder)).images.shape == (4, 3, 16, 16)
    # the size asked for counts: 4 x 3 x 8 x 8
    monkeypatch.setattr("deepclust.data.pixels.available_memory", lambda: 767)
    with pytest.raises(DataError, match="4 images of 8x8"):
        load_data(str(folder), image_size=8)
    monkeypatch.setattr("deepclust.data.pixels.available_memory", lambda: 768)
    assert load_data(str(folder), image_size=8).images.shape == (4, 3, 8, 8)


def test_available_memory_reads_the_machine():
    free = available_memory()
    assert free is not None and 0 < free < 2**50


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path):
    from PIL import Image

    folder = image_folder(tmp_path / "images", count=2)
    bomb = folder / "2.png"
    # 13400 x 13400 = 179.6 M pixels, over PIL's refusal limit (2 x MAX_IMAGE_PIXELS = 179.0 M); a 1-bit
    # image of one colour compresses to a few kB
    Image.new("1", (13400, 13400)).save(bomb)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(DataError, match=rf"refused image {re.escape(str(bomb))}: Image size \(179560000 pixels\) "
                                        r"exceeds limit of 178956970 pixels.* pass bad_images=skip"):
        load_data(str(folder), image_size=16)
    data = load_data(str(folder), image_size=16, bad_images="skip")
    assert len(data) == 2 and data.skipped == [str(bomb)]


def test_a_full_disk_outside_the_checkpoint_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match=rf"the disk is full under {re.escape(str(tmp_path))} \(\[Errno 28\] No space "
                                       r"left on device\); the last checkpoint there is intact\. Free space and run "
                                       "again with --resume"):
        with disk_full_is_a_run_error(tmp_path), open("/dev/full", "w") as f:  # every write: ENOSPC
            f.write("{}\n")
            f.flush()
    with pytest.raises(FileNotFoundError):  # other OS errors pass unchanged
        with disk_full_is_a_run_error(tmp_path):
            open(tmp_path / "absent" / "x")


def test_an_npz_over_the_available_memory_fails_before_its_array_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.npz"  # (5, 20, 30, 1): 3000 bytes stored, 5 x 3 x 20 x 20 = 6000 decoded at the short side
    np.savez(path, images=np.zeros((5, 20, 30, 1), dtype=np.uint8))
    monkeypatch.setattr("deepclust.data.pixels.available_memory", lambda: 8999)
    with pytest.raises(DataError, match=re.escape(f"{path}: 5 images of 20x20 need about 0.00 GiB (N x 3 x S x S "
                                                  "bytes decoded plus 0.00 GiB stored), but")):
        load_data(str(path))
    monkeypatch.setattr("deepclust.data.pixels.available_memory", lambda: 9000)
    assert load_data(str(path)).images.shape == (5, 3, 20, 20)
    monkeypatch.setattr("deepclust.data.pixels.available_memory", lambda: 3000 + 5 * 3 * 8 * 8 - 1)
    with pytest.raises(DataError, match="5 images of 8x8"):  # the image_size asked for
        load_data(str(path), image_size=8)
