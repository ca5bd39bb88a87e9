"""Projected time of every method's paper recipe on one NVIDIA H200, from FLOP and kernel counts made on the CPU.

    OMP_NUM_THREADS=1 python -m benchmarks.gpu_projection --out DIR [--methods npid,is,...]

Nothing runs on a GPU: every time written is a projection, never a measurement. One training step per method
(ResNet-18-CIFAR, batch 128, its default config and 50,000-row state, random data) runs on the CPU under bf16
autocast, as the trainer runs on a GPU: augmentation (the GPU colour-jitter path), forward + backward of the real
loss, SGD (foreach, as on CUDA), ``after_step``; ``FlopCounterMode`` counts its FLOPs and a ``TorchDispatchMode``
splits them by precision and counts aten ops (kernels). The epoch targets are counted analytically. Time = FLOPs /
(the precision's peak x MFU), MFU 10 / 30 / 50 %; launch floor = kernels x 5 us. Writes DIR/projection.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from deepclust.augment import Augment, color_jitter_masked, gray, normalize, resized_crop
from deepclust.backbones import Backbone
from deepclust.cluster.purify import progressive_cluster_count
from deepclust.epoch import batch_bounds, make_batch
from deepclust.eval import extract_features
from deepclust.methods import METHODS

N, B, EPOCHS, D, K, SIZE = 50_000, 128, 200, 128, 1000, 32
STEPS = len(batch_bounds(N, B))  # 391 (the last of 80 images)
LAUNCH_S = 5e-6  # per kernel launch (eager PyTorch's host cost per op is of this order)
MFUS = (0.10, 0.30, 0.50)
# NVIDIA's published figures, H100/H200 SXM, dense (no sparsity): BF16 tensor 989 TFLOPS, TF32 tensor 494 (the
# trainer sets allow_tf32, so float32 matmuls run there), FP64 tensor 67 (FP32 non-tensor is 67 as well).
PEAK = {"bf16": 989e12, "tf32": 494e12, "fp64": 67e12}
PRECISION = {torch.bfloat16: "bf16", torch.float16: "bf16", torch.float32: "tf32", torch.float64: "fp64"}
NO_KERNEL = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like, torch.ops.aten.lift_fresh,
             torch.ops.aten.new_empty, torch.ops.aten.set_, torch.ops.aten.resize_, torch.ops.aten._local_scalar_dense}
SYNC = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero}  # a host read of the device
ALL = ("npid", "is", "and", "pcp", "pad", "deepcluster", "odc", "uic", "supervised", "swav", "deepclusterv2", "sela")


class Count(TorchDispatchMode):
    """Per aten op: FLOPs (torch's formulas) by the precision of the first tensor argument, kernels, syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: Counter[str] = Counter()
        self.kernels = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        self.syncs += packet in SYNC
        self.kernels += not func.is_view and packet not in NO_KERNEL
        if packet in flop_registry:
            dtype = next(t.dtype for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            self.flops[PRECISION.get(dtype, "tf32")] += flop_registry[packet](*args, **kwargs, out_val=out)
        return out

    def add(self, other: Count, times: float = 1.0) -> None:
        for p, f in other.flops.items():
            self.flops[p] += f * times
        self.kernels += other.kernels * times
        self.syncs += other.syncs * times


def counted(fn, check: list[float]) -> tuple[Any, Count]:
    """Run ``fn`` under both counters; FlopCounterMode's total goes to ``check`` (it must equal ours)."""
    with FlopCounterMode(display=False) as fc, Count() as c:
        out = fn()
    check.append(fc.get_total_flops() - sum(c.flops.values()))
    return out, c


class DeviceAugment(Augment):
    """``Augment.apply`` with the colour-jitter path it takes on a GPU (on a CPU it takes a per-row one)."""

    def apply(self, images, p):
        if len(images) == 0:
            return super().apply(images, p)
        x = resized_crop(images.float().div_(255), p.boxes, self.size, p.flip)
        x = color_jitter_masked(x, p)
        return normalize(torch.where(p.to_gray.view(-1, 1, 1, 1), gray(x).expand_as(x), x))


def build(name: str, case: str = "") -> Any:
    """The method at N = 50,000 in the state of a late epoch (set by hand: no 50,000-image feature pass here)."""
    torch.manual_seed(0)
    cls = METHODS[name]
    labels = torch.randint(10, (N,)) if cls.uses_labels else None
    m = cls(Backbone("resnet18_cifar", SIZE, D), N, cls.Config(), labels=labels)
    if name == "and":  # an anchor round at fraction 1 (round 4): every sample has a neighbour
        m.neighbours[:, 0] = torch.randint(N, (N,))
    if name == "pcp":  # groups of ~50 (the floor), and the warm-up's IS branch (2 views) or none
        m.groups.copy_(torch.randint(K, (N,)))
        m.t, m.views = (0.2, 2) if case == "warmup" else (1.0, 1)
    if name == "pad":  # worst case: every sample isolated (second view for all 128); best: all in SCSs of 5
        m.scs.copy_(torch.full((N,), -1) if case == "worst" else torch.arange(N) // 5)
    if name == "deepcluster":
        m.assignments.copy_(torch.randint(K, (N,)))
    if name == "deepclusterv2":  # 3 heads of N / 50
        m.assignments.copy_(torch.randint(K, m.assignments.shape))
    if name == "sela":  # 10 heads of N / 50
        m.labels.copy_(torch.randint(m.k, m.labels.shape))
    if name == "odc":
        m.labels.copy_(torch.randint(m.config.k, (N,)))
        m.centroids.copy_(F.normalize(torch.randn(m.config.k, m.config.neck_dim), dim=1))
        m.weights.fill_(1.0 / m.config.k)
    return m.to(memory_format=torch.channels_last).train()


def count_step(name: str, case: str, check: list[float]) -> dict[str, Any]:
    """One training step of the method, by phase; ODC's refresh every ``centroid_interval`` steps amortised."""
    m = build(name, case)
    opt = torch.optim.SGD(m.param_groups(), lr=0.03, momentum=0.9, weight_decay=5e-4, foreach=True)
    pixels = torch.randint(256, (B, 3, SIZE, SIZE), dtype=torch.uint8)
    index = torch.randperm(N)[:B]
    gen = torch.Generator().manual_seed(0)
    if name == "pad":  # the once-an-epoch tables (SCS members, isolated samples): not part of a step
        m.view_rows(1, index, index.numpy())
    batch, aug = counted(lambda: make_batch(m, DeviceAugment(SIZE), pixels, index, index.numpy(), B, slice(0, B),
                                            gen, True), check)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(batch)
    (loss, outputs), fwd = counted(forward, check)
    _, bwd = counted(loss.backward, check)
    opt.step()  # the first step makes the momentum buffers; the counted one is a steady-state step
    _, sgd = counted(opt.step, check)
    if name == "odc":
        m.host_step = 1  # not an interval boundary: the refresh is counted on its own
    _, after = counted(lambda: m.after_step(batch, outputs), check)
    phases = {"augment": aug, "forward": fwd, "backward": bwd, "optimizer": sgd, "after_step": after}
    if name == "odc":
        _, refresh = counted(m.refresh, check)
        phases["refresh / 10"] = Count()
        phases["refresh / 10"].add(refresh, 1 / m.config.centroid_interval)
    whole = Count()
    for c in phases.values():
        whole.add(c)
    return {"case": case, "views": [len(v) for v in batch.views], "total": whole,
            "phases": {k: {"gflop": sum(c.flops.values()) / 1e9, "kernels": c.kernels} for k, c in phases.items()}}


Cost = tuple[dict[str, float], float]  # FLOPs by precision, kernels


def total(*costs: Cost) -> Cost:
    flops: Counter[str] = Counter()
    for c in costs:
        flops.update(c[0])
    return dict(flops), sum(c[1] for c in costs)


def kmeans_cost(n: int, k: int, d: int, iters: int = 20) -> Cost:
    """deepclust.cluster.kmeans at all ``iters`` passes (it may stop early): a (1024-row chunk) x (d + 1) x k
    product a chunk; ~5 kernels a chunk and ~12 a pass (estimated)."""
    return {"tf32": iters * 2.0 * n * k * (d + 1)}, iters * (math.ceil(n / 1024) * 5 + 12)


def knn_graph_cost(n: int, d: int) -> Cost:
    """exact_knn_graph's GPU schedule: blocks of 16,384 rows on and above the diagonal; ~20 kernels a block side."""
    size = math.isqrt(2**28)
    blocks = [(i, j) for i in range(0, n, size) for j in range(i, n, size)]
    return ({"tf32": sum(2.0 * min(size, n - i) * min(size, n - j) * d for i, j in blocks)},
            sum(20 if i == j else 40 for i, j in blocks))


def targets(name: str, epoch: int, fp: Count) -> Cost:
    """The epoch's ``before_epoch`` work, analytic; ``fp`` counts the feature pass of one batch of 128
    (extract_features, bf16), which runs in batches of 1024 on a GPU."""
    feature_pass = ({p: f * N / B for p, f in fp.flops.items()}, fp.kernels * math.ceil(N / 1024))
    costs: list[Cost] = []
    if name in ("npid", "pcp", "pad") and epoch == 0:
        costs.append(feature_pass)  # the bank's first fill (once a run; AND's is in its round 0, the NPID row)
    if name == "and" and epoch == 0:  # an anchor round's entropy pass over the bank, in chunks of 1342 rows
        costs.append(({"tf32": 2.0 * N * N * D}, math.ceil(N / (2**26 // N)) * 8))
    if name == "pcp":
        costs += [feature_pass, kmeans_cost(N, progressive_cluster_count(epoch, EPOCHS, N, K), D)]
    if name == "pad":  # + the SCS search on the host (not FLOPs)
        costs.append(knn_graph_cost(N, D))
    if name == "deepcluster":  # pooled 512-d -> PCA-256 (float64 covariance, float32 projection) -> k-means
        costs += [feature_pass, ({"fp64": 2.0 * N * 512 * 512, "tf32": 2.0 * N * 512 * 256}, 20),
                  kmeans_cost(N, K, 256)]
    if name == "deepclusterv2":  # spherical k-means of the memory of last epoch's embeddings (no feature pass):
        costs += [kmeans_cost(N, K, D, iters=10)] * 3  # 3 heads of N / 50, 10 passes
    if name == "sela":  # labels every epoch: a pooled feature pass, 10 heads' logits (512 -> N / 50), and 100
        # float64 Sinkhorn iterations a head (two matrix-vector products over the N x K plan, ~4 kernels each)
        costs += [feature_pass, ({"tf32": 10 * 2.0 * N * 512 * K, "fp64": 10 * 100 * 4.0 * N * K}, 10 * 100 * 4)]
    if name == "odc" and epoch == 0:  # the initial k-means of the 256-d neck features (once a run)
        costs += [feature_pass, kmeans_cost(N, K, 256)]
    return total(*costs)


def seconds(flops: dict[str, float], mfu: float) -> float:
    return sum(f / (PEAK[p] * mfu) for p, f in flops.items())


def project(name: str, steps: dict[str, dict[str, Any]], fp: Count) -> dict[str, Any]:
    """Every epoch of the round at each MFU, at the launch floor, and "likely": per step and for the targets the
    slower of the floor and 30 % MFU (launches and compute overlap). PCP's warm-up covers epochs < 180."""
    main = {"pcp": "warmup", "pad": "worst"}.get(name, "")
    rows = []
    for e in range(EPOCHS):
        s = steps["warmup" if e < 0.9 * EPOCHS else "late"]["total"] if name == "pcp" else steps[main]["total"]
        t_flops, t_kernels = targets(name, e, fp)
        flops, kernels = total(({p: f * N / B for p, f in s.flops.items()}, STEPS * s.kernels), (t_flops, t_kernels))
        likely = (STEPS * max(s.kernels * LAUNCH_S, seconds(s.flops, MFUS[1]))
                  + max(t_kernels * LAUNCH_S, seconds(t_flops, MFUS[1])))
        rows.append([seconds(flops, u) for u in MFUS] + [kernels * LAUNCH_S, likely, sum(t_flops.values()) / 1e9])
    s = steps[main]["total"]
    mean = [sum(r[i] for r in rows) / EPOCHS for i in range(6)]
    step_floor, step_30 = s.kernels * LAUNCH_S, seconds(s.flops, MFUS[1])
    return {"case": main or "-", "views": steps[main]["views"], "step_gflop": sum(s.flops.values()) / 1e9,
            "step_gflop_by_precision": {p: f / 1e9 for p, f in s.flops.items()}, "kernels_per_step": s.kernels,
            "syncs_per_step": s.syncs, "phases": steps[main]["phases"],
            "other_cases": {k: {"step_gflop": sum(v["total"].flops.values()) / 1e9, "kernels": v["total"].kernels,
                                "views": v["views"]} for k, v in steps.items() if k != main},
            "targets_gflop_mean": mean[5], "targets_gflop_epochs_0_2": [r[5] for r in rows[:3]],
            "epoch_s": mean[:3], "hours_200": [x * EPOCHS / 3600 for x in mean[:3]],
            "floor_epoch_s": mean[3], "floor_hours_200": mean[3] * EPOCHS / 3600,
            "likely_epoch_s": mean[4], "likely_hours_200": mean[4] * EPOCHS / 3600,
            "likely_epoch_s_epochs_0_2": [r[4] for r in rows[:3]],
            "images_per_s_steps": {"floor": B / step_floor, "mfu_30%": B / step_30, "likely": B / max(step_floor,
                                                                                                     step_30)}}


def notes(r: dict[str, Any], fp: Count, check: list[float]) -> list[str]:
    m, per_image, out = r["methods"], sum(fp.flops.values()) / B, []
    out.append(f"Feature pass (eval, bf16, 1024 a batch): {per_image / 1e9:.2f} GFLOP an image, "
               f"{per_image * N / 1e12:.1f} TFLOP for 50,000 images (a third of a training epoch).")
    if "pcp" in m:
        p, late = m["pcp"], m["pcp"]["other_cases"]["late"]
        out.append(f"PCP: IS warm-up (2 views) until epoch 180, then 1 view ({late['step_gflop']:.1f} GFLOP, "
                   f"{late['kernels']:.0f} kernels a step); k-means of N_t = 50,000 -> 1,000 clusters at all 20 "
                   "iterations (an upper bound: near N_t = N it stops after 2). Epochs 0 / 1 / 2: targets "
                   + " / ".join(f"{t:,.0f}" for t in p["targets_gflop_epochs_0_2"]) + " GFLOP, likely "
                   + " / ".join(f"{t:.2f}" for t in p["likely_epoch_s_epochs_0_2"]) + " s.")
    if "pad" in m:
        b = m["pad"]["other_cases"]["best"]
        out.append("PAD: worst case, every sample isolated (a second view of all 128 rows, forwarded without "
                   f"gradient); every sample in an SCS: {b['step_gflop']:.1f} GFLOP, {b['kernels']:.0f} kernels a "
                   "step. Its SCS search runs on the host (0.02-0.04 s at N = 50,000, BENCHMARKS.md).")
    if "and" in m and "npid" in m:
        h = m["npid"]["likely_hours_200"] + 4 * m["and"]["likely_hours_200"]
        out.append("AND: one anchor round (the bank's entropy pass at its first epoch); the recipe's 5 rounds "
                   f"(NPID, then 4 anchor rounds) likely take {h:.2f} h.")
    if "supervised" in m:
        out.append(f"Kernels: the augmentation makes {m['supervised']['phases']['augment']['kernels']:.0f} of the "
                   f"supervised step's {m['supervised']['kernels_per_step']:.0f} (per view; forward + backward ~210).")
    return out + ["ODC: the centroid refresh (every 10 steps) is counted once and amortised into the step.",
                  "Not counted: kNN evaluations (eval_every 10: 60,000 images forward + 2 x 10,000 x 50,000 x 128 "
                  "FLOP each), checkpoints, host work and syncs inside the targets.",
                  f"FlopCounterMode and the precision split differ by at most {max(map(abs, check)):.0f} FLOP."]


def markdown(r: dict[str, Any]) -> str:
    lines = [f"**Projection, not a measurement.** `{r['command']}`, {r['date']}; counted on {r['host']} (the counts "
             "do not depend on it). Assumptions: one H200 at NVIDIA's published dense peaks (H100/H200 SXM: BF16 "
             "989, TF32 494, FP64 67 TFLOPS), each FLOP at its precision's peak (bf16 autocast; float32 matmuls "
             "such as the bank logits and k-means on TF32) x an assumed MFU of 10 / 30 / 50 %; launch floor = "
             "non-view aten ops x 5 us; likely = the slower of the two, step by step. A ResNet-18 at batch 128 on "
             "32 px images is launch-bound, far below peak. Data on the device; 391 steps an epoch, 200 epochs; "
             "targets = the epoch's `before_epoch` work, mean over the round.", "",
             "| method (case) | rows per view | step GFLOP (fp32 share) | targets GFLOP / epoch | kernels / step | "
             "s / epoch at MFU 10 / 30 / 50 % | h / 200 epochs at 10 / 30 / 50 % | launch floor s / epoch (h) | "
             "step images/s: floor / 30 % | likely s / epoch (h), step images/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in r["methods"].items():
        fp32, ips = 1 - m["step_gflop_by_precision"].get("bf16", 0) / m["step_gflop"], m["images_per_s_steps"]
        lines.append(f"| {name} ({m['case']}) | {'+'.join(map(str, m['views']))} | {m['step_gflop']:.1f} "
                     f"({fp32:.1%}) | {m['targets_gflop_mean']:,.0f} | {m['kernels_per_step']:,.0f} | "
                     + " / ".join(f"{x:.2f}" for x in m["epoch_s"]) + " | "
                     + " / ".join(f"{x:.3f}" for x in m["hours_200"])
                     + f" | {m['floor_epoch_s']:.2f} ({m['floor_hours_200']:.3f}) | {ips['floor']:,.0f} / "
                     f"{ips['mfu_30%']:,.0f} | {m['likely_epoch_s']:.2f} ({m['likely_hours_200']:.3f}), "
                     f"{ips['likely']:,.0f} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in r["notes"]]) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(ALL))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check: list[float] = []
    pixels = torch.randint(256, (B, 3, SIZE, SIZE), dtype=torch.uint8)
    net = Backbone("resnet18_cifar", SIZE, D)
    _, fp = counted(lambda: extract_features(net, pixels, "embedding", batch_size=B, bf16=True), check)
    methods = {}
    for name in args.methods.split(","):
        cases = {"pcp": ("warmup", "late"), "pad": ("worst", "best")}.get(name, ("",))
        methods[name] = project(name, {case: count_step(name, case, check) for case in cases}, fp)
        print(name, f"{methods[name]['step_gflop']:.1f} GFLOP, {methods[name]['kernels_per_step']:.0f} kernels a step",
              flush=True)
    result = {"command": f"OMP_NUM_THREADS=1 python -m benchmarks.gpu_projection --out {args.out}",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y"),
              "host": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), torch {torch.__version__}, "
              "1 thread", "assumptions": {"peak_flops": PEAK, "mfu": MFUS, "launch_s": LAUNCH_S, "steps": STEPS,
                                          "epochs": EPOCHS, "n": N, "batch": B, "k": K}, "methods": methods}
    result["notes"] = notes(result, fp, check)
    (out / "projection.json").write_text(json.dumps(result, indent=1))
    (out / "projection.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
