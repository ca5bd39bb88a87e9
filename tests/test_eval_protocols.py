"""The papers' other protocols: few-shot episodes, long-tail subsets, per-layer probes, --protocol all, transfer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepclust.cli import main
from deepclust.eval import fewshot_accuracy


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_json(capsys, *argv) -> dict:
    rc = main([str(a) for a in argv] + ["--json"])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)


# --- few-shot ------------------------------------------------------------------------------------


def test_fewshot_separable_features_are_perfect_at_one_shot():
    labels = torch.arange(8).repeat_interleave(20)
    feats = F.one_hot(labels, 8).float() + 0.05 * torch.randn(160, 8, generator=gen(0))  # one axis per class
    score = fewshot_accuracy(feats, labels, ways=5, shots=1, queries=10, episodes=200)
    assert score == {"mean": 100.0, "ci95": 0.0}


def test_fewshot_random_features_are_at_chance():
    labels = torch.arange(10).repeat_interleave(40)
    feats = torch.randn(400, 32, generator=gen(1))
    for ways in (2, 5):
        score = fewshot_accuracy(feats, labels, ways=ways, shots=5, queries=15, episodes=800, seed=3)
        assert 0 < score["ci95"] < 2.0
        assert abs(score["mean"] - 100.0 / ways) < 3 * score["ci95"]


def test_fewshot_more_shots_help_on_noisy_clusters_and_seed_fixes_the_draws():
    labels = torch.arange(6).repeat_interleave(30)
    centres = torch.randn(6, 16, generator=gen(2))
    feats = centres[labels] + 1.5 * torch.randn(180, 16, generator=gen(3))
    one = fewshot_accuracy(feats, labels, ways=5, shots=1, episodes=300, seed=7)
    five = fewshot_accuracy(feats, labels, ways=5, shots=5, episodes=300, seed=7)
    assert five["mean"] - five["ci95"] > one["mean"] + one["ci95"]  # prototypes of 5 beat single images
    assert fewshot_accuracy(feats, labels, ways=5, shots=1, episodes=300, seed=7) == one
    assert fewshot_accuracy(feats, labels, ways=5, shots=1, episodes=300, seed=8) != one


def test_fewshot_refuses_episodes_the_data_cannot_fill():
    feats = torch.randn(5, 4, generator=gen(4))
    labels = torch.tensor([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="need 2 classes of at least 3 images"):
        fewshot_accuracy(feats, labels, ways=2, shots=2, queries=1)
    with pytest.raises(ValueError, match="ways >= 2"):
        fewshot_accuracy(feats, labels, ways=1)


def test_eval_fewshot_cli_reports_both_shots(trained_checkpoint, capsys):
    got = run_json(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits", "--protocol", "fewshot",
                   "--episodes", "100")
    for shots in (1, 5):
        assert 20 < got[f"fewshot_5way_{shots}shot"] <= 100  # chance is 20% at 5 ways
        assert 0 < got[f"fewshot_5way_{shots}shot_ci95"] < 10
    assert got["fewshot_5way_5shot"] > got["fewshot_5way_1shot"]
    assert got["fewshot_episodes"] == 100
