"""Shared fixtures: one tiny trained NPID run (session-scoped), an independent weighted kNN."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from deepclust.cli import main

# Tiny tensors everywhere: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine, which
# made e.g. index_add_ on a 160 x 32 tensor ~100x slower, and keeps float results thread-count independent.
torch.set_num_threads(1)
# deterministic=True on CUDA raises at the first cuBLAS matmul unless this is set before the first handle exists.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Every device the suite checks: the CPU here and in CI; a GPU machine adds cuda (benchmarks/gpu_check runs it).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The tiny run every CLI test reuses: digits, 4-layer ConvNet of width 8, one epoch, 200 images.
TRAIN_FLAGS = ["--data", "digits", "--backbone", "convnet", "--epochs", "1"]
TRAIN_KEYS = ["width=8", "subset=200", "batch_size=64", "progress=false"]


def weighted_knn_predict(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int = 200,
                         tau: float = 0.1) -> np.ndarray:
    """Reference weighted kNN: sklearn cosine neighbours, each votes exp(similarity / tau) for its label."""
    k = min(k, len(train))
    nn_index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train)
    dist, idx = nn_index.kneighbors(test)
    sim = 1.0 - dist
    num_classes = int(max(train_labels.max(), 0)) + 1
    votes = np.zeros((len(test), num_classes))
    weights = np.exp(sim / tau)
    for row in range(len(test)):
        np.add.at(votes[row], train_labels[idx[row]], weights[row])
    return votes.argmax(1)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a building-block or training test runs on: cpu, and cuda where a GPU is visible."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def tiny_train_args() -> list[str]:
    """`deepclust train` flags and keys of the tiny run (add --method and --out)."""
    return [*TRAIN_FLAGS, *TRAIN_KEYS]


@pytest.fixture(scope="session")
def sklearn_knn():
    return weighted_knn_predict


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """OUT folder of `deepclust train --method npid` on 200 digits for one epoch (ConvNet width 8)."""
    out = tmp_path_factory.mktemp("npid_run")
    rc = main(["train", "--method", "npid", *TRAIN_FLAGS, "--out", str(out), *TRAIN_KEYS])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def trained_checkpoint(trained_run: Path) -> Path:
    return trained_run / "checkpoint.pt"


@pytest.fixture
def keep_determinism_setting():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)  # deterministic=True switches it on for the whole process
