"""Started by tests/test_distributed.py under ``torchrun`` (gloo, CPU): runs the jobs of a JSON spec.

``train``: config layers to train (``resume`` to continue; ``copy_at``: [epoch, step, folder] copies the run's
folder as it stands after the checkpoint taken inside that epoch at that step, as a killed run leaves it);
``kmeans``: a saved feature matrix to cluster, the result saved by rank 0. Not a test module itself.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from deepclust import distributed
from deepclust import train as trainer
from deepclust.cluster import kmeans
from deepclust.config import resolve
from deepclust.train import train


def copy_at(epoch: int, step: int, folder: str) -> None:
    save = trainer.save_checkpoint

    def save_and_copy(path: Path, payload: dict) -> None:
        save(path, payload)
        mid = payload.get("mid_epoch")
        if payload["next_epoch"] == epoch and mid is not None and mid["step"] == step and not Path(folder).exists():
            shutil.copytree(path.parent, folder, ignore=shutil.ignore_patterns("*.lock"))
    trainer.save_checkpoint = save_and_copy


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    distributed.initialise(torch.device("cpu"))
    for job in spec.get("train", []):
        cfg, hp = resolve([job["config"]])
        save = trainer.save_checkpoint
        if "copy_at" in job:
            copy_at(*job["copy_at"])
        train(cfg, hp, resume=job.get("resume", False))
        trainer.save_checkpoint = save
    if "kmeans" in spec:
        k = spec["kmeans"]
        result = kmeans(torch.load(k["x"], weights_only=True), k["k"], iters=k["iters"], seed=k["seed"])
        if distributed.is_main():
            torch.save({"assignments": result.assignments, "centroids": result.centroids}, k["out"])
    distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1])
