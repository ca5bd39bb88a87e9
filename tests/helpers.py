"""Helpers shared by the method tests: a tiny learnable npz, a short-run config, resume-equals-uninterrupted."""

from __future__ import annotations

import json

import numpy as np
import torch

from deepclust.checkpoint import load_checkpoint
from deepclust.config import resolve
from deepclust.methods import EpochContext
from deepclust.train import train


def tiny_npz(tmp_path, n=96, classes=4, size=16, seed=0):
    """Images whose class sets a dominant colour and a bar position, so a few epochs can learn something."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, :, :, c % 3] += 120
        images[i, 2 * c: 2 * c + 3, :, :] = 250
    path = tmp_path / "tiny.npz"
    np.savez(path, images=images, labels=labels)
    return str(path)


def run_cfg(tmp_path, method, name="run", **keys):
    data = tiny_npz(tmp_path)
    layer = {"method": method, "data": data, "test_data": data, "backbone": "convnet", "width": 8,
             "epochs": 2, "batch_size": 32, "out": str(tmp_path / name), "progress": False, "seed": 3,
             "deterministic": True, "lr_decay_at": [], "device": "cpu", **keys}  # pass device=... for another
    return resolve([layer])


def read_rows(out):
    """The epochs' metrics rows (without the untrained network's baseline row)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("untrained")]


def assert_resume_equals_uninterrupted(tmp_path, method: str, stop_after: int, **keys) -> list[dict]:
    """Train ``method`` once straight through and once cut after ``stop_after`` epochs and resumed: the
    metrics rows (but timings) and every tensor of the final state must be equal. Returns the rows."""
    cfg, hp = run_cfg(tmp_path, method, name="full", **keys)
    train(cfg, hp)
    cfg, hp = run_cfg(tmp_path, method, name="cut", stop_after=stop_after, **keys)
    train(cfg, hp)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["next_epoch"] == stop_after
    cfg, hp = run_cfg(tmp_path, method, name="cut", **keys)
    train(cfg, hp, resume=True)
    full, cut = read_rows(tmp_path / "full"), read_rows(tmp_path / "cut")
    drop = ("time", "targets_time", "cluster_time", "graph_time", "scs_time")  # timings
    assert [{k: v for k, v in r.items() if k not in drop} for r in full] == \
        [{k: v for k, v in r.items() if k not in drop} for r in cut]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["state"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return full


def context(method, images, labels=None, epoch=0, round_=0, epochs=2, seed=0, optimizer=None):
    """A real EpochContext around a real feature pass, as the trainer builds it."""
    from deepclust.eval import extract_features
    from deepclust.train import reset_optimizer_state

    def extract(feature, normalize=True):
        return extract_features(method.backbone, images, feature, normalize=normalize)

    reset = (lambda m: reset_optimizer_state(optimizer, m)) if optimizer is not None else (lambda m: None)
    return EpochContext(round_, epoch, epochs, 1, seed, torch.Generator().manual_seed(seed), torch.device("cpu"),
                        extract, labels, reset)
