"""Data-parallel training under ``torchrun``: the one module that knows about ranks.

Every rank holds the whole method state (memory bank, labels, centroids) and keeps it identical to the
others: the trainer splits each global batch into contiguous parts, gathers every step's sample ids and
outputs so that each rank applies the same state update, and broadcasts rank 0's state after each epoch's
targets are made. k-means shards its assignment pass (see ``cluster.kmeans``); ODC's centroid refresh, whose
float sums may differ in the last bits between GPUs, is computed by every rank without a collective and rank
0's result broadcast (``methods.odc``). A checkpoint therefore
holds the whole state and resumes on any number of processes. Outside ``torchrun`` every helper here is
the identity (world size 1).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError

log = logging.getLogger(__name__)


def launched() -> bool:
    """True in a process that torchrun started with more than one process in all."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank as torchrun numbered it (0 outside torchrun); valid before and after the group."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def check_gpu_count(nproc: int, device: torch.device) -> None:
    """Refuse ``nproc`` processes on this machine, one GPU each, when fewer GPUs are visible (a clear error
    instead of ``torch.cuda.set_device``'s invalid device ordinal in some of the ranks)."""
    if device.type != "cuda":
        return
    visible = torch.cuda.device_count()
    if nproc > visible:
        seen = "no GPU is visible" if visible == 0 else f"only {visible} GPU{'s are' if visible > 1 else ' is'} visible"
        fix = f"--nproc {visible} or fewer, or " if visible else ""
        raise ConfigError(f"{nproc} processes on this machine need a GPU each (device={device}), but {seen} "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run with "
                          f"{fix}device=cpu for CPU processes")


def initialise(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); returns this rank's device."""
    if not launched():
        return device
    if device.type == "cuda":
        check_gpu_count(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device)  # every rank says it, not a crash
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("rank %d of %d (%s, %s)", rank(), world_size(), dist.get_backend(), device)
    return device


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def part_sizes(n: int) -> list[int]:
    """Rows of each rank when ``n`` rows are split in contiguous parts (the first ``n % world`` get one more)."""
    world = world_size()
    return [n // world + (r < n % world) for r in range(world)]


def local_part(n: int) -> slice:
    """This rank's contiguous rows of ``n``: the parts, concatenated in rank order, are the whole."""
    sizes = part_sizes(n)
    start = sum(sizes[: rank()])
    return slice(start, start + sizes[rank()])


class BatchSplit:
    """The part sizes of the global batch the trainer is running (set each step by ``split_batch``), so that
    gathers of batch rows need not exchange their lengths: that exchange is a device sync every step."""

    sizes: list[int] | None = None


BATCH = BatchSplit()


def split_batch(size: int) -> slice:
    """This rank's rows of a global batch of ``size``, remembered for ``gather_batch_rows_at``."""
    BATCH.sizes = part_sizes(size)
    return local_part(size)


def gather_rows_at(x: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Every rank's ``x`` concatenated along dim 0 in rank order (no gradient; parts may differ in length),
    and the row where this rank's part starts. Without ``sizes`` (each rank's row count) they are exchanged
    first, which makes the host wait for the device."""
    world = world_size()
    if world == 1:
        return x, 0
    if sizes is None:
        count = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
    if sizes[rank()] != x.shape[0]:
        raise ValueError(f"rank {rank()} gathers {x.shape[0]} rows, but its part of the batch has {sizes[rank()]}")
    wire = x.detach().to(torch.uint8) if x.dtype == torch.bool else x.detach()  # gloo has no bool
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=wire.dtype, device=x.device)
    padded[: x.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
    return (out.bool() if x.dtype == torch.bool else out), sum(sizes[: rank()])


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order (no gradient)."""
    return gather_rows_at(x)[0]


def gather_batch_rows_at(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``gather_rows_at`` for a tensor with a row per sample of the current batch (the trainer's split): the
    global batch's rows with no length exchange, and where this rank's rows start. A batch-coupled loss (IS)
    compares its rows with all of them."""
    return gather_rows_at(x, BATCH.sizes)


def gather_batch_rows(x: torch.Tensor) -> torch.Tensor:
    return gather_batch_rows_at(x)[0]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (and returned)."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place (and returned)."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any (a collective: every rank must call it)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place."""
    if world_size() == 1:
        return
    for t in tensors:
        if t.dtype == torch.bool:
            wire = t.to(torch.uint8)
            dist.broadcast(wire, 0)
            t.copy_(wire.bool())
        else:
            dist.broadcast(t, 0)


def broadcast_state(module: nn.Module) -> None:
    """Every parameter and buffer of ``module`` from rank 0 (guards the replicas against any drift)."""
    broadcast_(list(module.state_dict().values()))


def sharded_rows(fn, n: int) -> torch.Tensor:
    """``fn(slice)`` on this rank's part of ``n`` rows, gathered: a feature pass split across ranks."""
    return gather_rows_at(fn(local_part(n)), part_sizes(n))[0]  # one process: the gather is the identity


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: every rank's output depends on every rank's input, so the input's
    gradient is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch, on CPU (gloo, where torch's SyncBatchNorm needs a GPU) and GPU alike.

    One all-reduce a layer in forward and one in backward: each rank packs [row count, sum, sum of squares]
    of its rows into one float64 buffer, summed over ranks with an autograd-aware all-reduce, and the mean
    and variance come from the sums. The count travels in the buffer because it is not the trainer's split
    of the batch (PAD forwards a subset of rows). Single-pass E[x^2] - mean^2 in float32 would lose about
    mean^2 / var x 1e-7 of the variance (1e-4 for a mean 25 times the spread); here each rank's moments are
    taken in float32 about its own mean (as a two-pass variance) and only the 2C + 1 sums are float64, where
    the cancellation costs nothing: float32 two-pass accuracy, no float64 copy of the activations. Running
    statistics as BatchNorm's (unbiased variance). A rank with no rows (PAD's forward of its isolated
    samples) joins with zero sums; when every rank is empty the running statistics are left as they were.
    Nothing is read on the host. Used instead of SyncBatchNorm on GPUs too, whose empty-rank statistics come
    in the input's dtype (bf16 under autocast) while the other ranks' are float32, in one all-gather. Takes
    (N, C) or (N, C, ...) input; state_dict keys equal BatchNorm's, so checkpoints move between world sizes.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected (N, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training or not self.track_running_stats, self.momentum or 0.0, self.eps)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        rows = x.numel() // max(1, x.shape[1])  # this rank's values a channel, from the shape: no device read
        xf = x.float()
        # Moments about a shift near the mean (this rank's, held constant: the identities below hold for any
        # shift), so that x - shift keeps float32's precision; the rank's sums of x and x^2 then come exactly
        # from them in float64: sum x = n s + sum d, sum x^2 = sum d^2 + 2 s sum d + n s^2, with d = x - s.
        shift = (xf.detach().sum(dims) / max(1, rows)).view(shape)
        centred = xf - shift
        d1, d2 = centred.sum(dims).double(), (centred * centred).sum(dims).double()
        s = shift.flatten().double()
        # one buffer, one all-reduce; the count filled on the device (a tensor from a Python number would be a
        # host-to-device copy)
        packed = torch.cat((x.new_full((1,), rows, dtype=torch.float64), rows * s + d1, d2 + 2 * s * d1 + rows * s * s))
        total = _AllReduceSum.apply(packed)
        c = x.shape[1]
        count, seen = total[0], total[0].clamp(min=1)  # 0 / 1 = 0 statistics when every rank is empty
        mean64 = total[1:1 + c] / seen
        var64 = (total[1 + c:] / seen - mean64 * mean64).clamp(min=0)
        mean, var = mean64.float(), var64.float()
        if self.track_running_stats:
            with torch.no_grad():
                any_rows = (count > 0).float()
                self.num_batches_tracked += any_rows.long()
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.clamp(min=1)
                m = m * any_rows  # no decay towards the zero statistics of an empty batch
                unbiased = (var64 * count / (count - 1).clamp(min=1)).float()
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        # x - mean as (x - shift) - (mean - shift): both terms small, no float32 cancellation of large values
        y = (centred - (mean64 - s).float().view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of ``module`` normalised over the global batch (``GlobalBatchNorm``), in place. A subclass
    that does more than normalise (timm's ``BatchNormAct2d``: an activation after it) is refused, not converted:
    the swap would drop what it adds."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm) and \
                type(child) not in PLAIN_BATCHNORMS:
            raise ConfigError(f"{name} is a {type(child).__name__}, a BatchNorm with more in it than global "
                              "statistics can replace: train this backbone in one process (no --nproc / torchrun), "
                              "or pick a model with plain BatchNorm or none (a ResNet, a ViT, a ConvNeXt)")
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            global_batchnorm(child)
    return module
