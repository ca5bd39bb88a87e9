"""The benchmark harness fails loudly: a method that errors is named, the others still run, exit is non-zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_harness_names_a_failed_method_and_exits_non_zero(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8), labels=np.arange(20) % 2)
    out = tmp_path / "bench"
    # The smoke profile asks DeepCluster for 30 clusters: 20 images cannot give them.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--profile", "smoke", "--methods", "random,deepcluster",
         "--data", str(data), "--test-data", str(data), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: deepcluster" in proc.stderr
    table = (out / "results.md").read_text()
    assert "FAILED: deepcluster" in table and "k = 30 clusters but only 20 samples" in table
    random_row = next(line for line in table.splitlines() if line.startswith("| random |"))
    assert "FAILED" not in random_row
