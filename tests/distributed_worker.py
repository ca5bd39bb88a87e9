"""Started by tests/test_distributed.py under ``torchrun`` (gloo, CPU): runs the jobs of a JSON spec.

``train``: config layers to train (``resume`` to continue); ``kmeans``: a saved feature matrix to cluster,
the result saved by rank 0. Not a test module itself.
"""

from __future__ import annotations

import json
import sys

import torch

from deepclust import distributed
from deepclust.cluster import kmeans
from deepclust.config import resolve
from deepclust.train import train


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    distributed.initialise(torch.device("cpu"))
    for job in spec.get("train", []):
        cfg, hp = resolve([job["config"]])
        train(cfg, hp, resume=job.get("resume", False))
    if "kmeans" in spec:
        k = spec["kmeans"]
        result = kmeans(torch.load(k["x"], weights_only=True), k["k"], iters=k["iters"], seed=k["seed"])
        if distributed.is_main():
            torch.save({"assignments": result.assignments, "centroids": result.centroids}, k["out"])
    distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1])
