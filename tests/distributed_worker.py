"""Started by tests/test_distributed.py under ``torchrun`` (gloo, CPU): runs the jobs of a JSON spec.

``train``: config layers to train (``resume`` to continue; ``copy_at``: [epoch, step, folder] copies the run's
folder as it stands after the checkpoint taken inside that epoch at that step, as a killed run leaves it);
``odc_drift`` (in a train job): ODC with rank 1's centroid sums one ulp above rank 0's (as CUDA atomics can
leave them), a small-cluster repair forced at every refresh (``labels_drift``: rank 1 repairs one more cluster
than rank 0, as after labels drifted apart), and each rank's state saved after every epoch;
``kmeans``: a saved feature matrix to cluster, the result saved by rank 0; ``batchnorm``: saved GlobalBatchNorm
cases (input, upstream gradient, this rank's rows), each rank's output, gradients, running statistics and count
of ``dist.all_reduce`` calls in forward and in backward saved. Not a test module itself.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from deepclust import distributed
from deepclust import train as trainer
from deepclust.cluster import kmeans
from deepclust.config import resolve
from deepclust.memory import MemoryBank
from deepclust.methods import odc
from deepclust.train import train


def copy_at(epoch: int, step: int, folder: str) -> None:
    save = trainer.save_checkpoint

    def save_and_copy(path: Path, payload: dict) -> None:
        save(path, payload)
        mid = payload.get("mid_epoch")
        if payload["next_epoch"] == epoch and mid is not None and mid["step"] == step and not Path(folder).exists():
            shutil.copytree(path.parent, folder, ignore=shutil.ignore_patterns("*.lock"))
    trainer.save_checkpoint = save_and_copy


@contextmanager
def odc_drift(out: str, labels_drift: bool = False):
    """Rank 1's ``class_sums`` one ulp up (float sums in another order); every repair forced by shrinking
    cluster 0 (and on rank 1 with ``labels_drift`` cluster 2 too) to ``min_size`` members first; after each
    epoch this rank's ODC state saved to ``out/rank{r}_epoch{e}.pt`` with how many repairs ran."""
    class_sums, dissolve, after_epoch = MemoryBank.class_sums, odc.dissolve_small_clusters, odc.ODC.after_epoch
    repairs = [0]

    def nudged_sums(self, labels, k, *args, **kwargs):
        sums, counts = class_sums(self, labels, k, *args, **kwargs)
        if distributed.rank() == 1:
            sums = torch.nextafter(sums, torch.full_like(sums, math.inf))
        return sums, counts

    def forced_repair(labels, rows_of, centroids, min_size, seed):
        for small in (0, 2) if labels_drift and distributed.rank() == 1 else (0,):
            members = torch.nonzero(labels == small).flatten()
            labels[members[min_size:]] = 1  # the cluster keeps min_size members: small
        changed = dissolve(labels, rows_of, centroids, min_size, seed)
        repairs[0] += changed is not None
        return changed

    def saving_after_epoch(self, ctx):
        stats = after_epoch(self, ctx)
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        torch.save({"state": state, "repairs": repairs[0]}, Path(out) / f"rank{distributed.rank()}_epoch{ctx.epoch}.pt")
        return stats

    Path(out).mkdir(parents=True, exist_ok=True)
    MemoryBank.class_sums, odc.dissolve_small_clusters, odc.ODC.after_epoch = (nudged_sums, forced_repair,
                                                                               saving_after_epoch)
    try:
        yield
    finally:
        MemoryBank.class_sums, odc.dissolve_small_clusters, odc.ODC.after_epoch = class_sums, dissolve, after_epoch


def batchnorm_cases(spec: dict) -> None:
    """Each case through one GlobalBatchNorm on this rank's rows, counting the all-reduces it makes."""
    calls = [0]
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return all_reduce(*args, **kwargs)

    results = []
    dist.all_reduce = counted
    try:
        for case in torch.load(spec["cases"], weights_only=True):
            x, grad, weight, bias = case["x"], case["grad"], case["weight"], case["bias"]
            rows = case["rows"][distributed.rank()]
            bn = distributed.GlobalBatchNorm(x.shape[1], momentum=0.3).train()
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
            mine = x[rows[0]:rows[1]].clone().requires_grad_()
            calls[0] = 0
            y = bn(mine)
            forward = calls[0]
            y.backward(grad[rows[0]:rows[1]])
            results.append({"y": y.detach(), "x_grad": mine.grad, "weight_grad": bn.weight.grad,
                            "bias_grad": bn.bias.grad, "running_mean": bn.running_mean,
                            "running_var": bn.running_var, "forward": forward, "backward": calls[0] - forward})
    finally:
        dist.all_reduce = all_reduce
    torch.save(results, Path(spec["out"]) / f"bn_rank{distributed.rank()}.pt")


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    distributed.initialise(torch.device("cpu"))
    for job in spec.get("train", []):
        cfg, hp = resolve([job["config"]])
        save = trainer.save_checkpoint
        if "copy_at" in job:
            copy_at(*job["copy_at"])
        if "odc_drift" in job:
            with odc_drift(**job["odc_drift"]):
                train(cfg, hp, resume=job.get("resume", False))
        else:
            train(cfg, hp, resume=job.get("resume", False))
        trainer.save_checkpoint = save
    if "batchnorm" in spec:
        batchnorm_cases(spec["batchnorm"])
    if "kmeans" in spec:
        k = spec["kmeans"]
        result = kmeans(torch.load(k["x"], weights_only=True), k["k"], iters=k["iters"], seed=k["seed"])
        if distributed.is_main():
            torch.save({"assignments": result.assignments, "centroids": result.centroids}, k["out"])
    distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1])
