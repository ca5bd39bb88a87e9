"""One epoch's pieces, in the order the trainer runs them: the epoch cursor (where an epoch stands, what a
checkpoint inside it saves), the batches of each step, the augmented views (``make_batch``) and the step
itself (``train_step``: loss, backward, optimiser step, ``after_step``). ``train.run_epoch`` strings them
together; nothing here reads the device inside a step (``tests/test_fake_cuda.py``)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import distributed
from .augment import Augment, test_transform
from .data import IndexedImages
from .methods.base import Batch, EpochContext, Method
from .run import Run
from .runtime import allow_sync, host_to_device, sync_debug_mode
from .safety import STOP, LossGuard, ignore_stop_signals, start_workers

log = logging.getLogger(__name__)


def keep_batch(batch):
    return batch  # IndexedImages already returns a whole (pixels, index) batch


STOP_CHECK_EVERY = 20  # steps between torchrun's all-reduce of "was any rank stopped?" (a sync each)


@dataclass
class EpochCursor:
    """Where an epoch stands: its sample order (on the host), the next step, the generators, the partial sums.
    A checkpoint inside the epoch saves it (``state``) and a resumed run rebuilds it (``resume_cursor``)."""

    order: torch.Tensor
    step: int
    gen: torch.Generator  # CPU: the epoch's targets and order
    aug_gen: torch.Generator | None  # on the training device: augmentation (None: the global generator)
    loss_sum: torch.Tensor
    steps: int = 0
    skipped: int = 0
    targets_time: float = 0.0
    started: float = 0.0  # perf_counter at the epoch's start (moved back by a resumed epoch's time)

    def state(self, method: Method) -> dict[str, Any]:
        return {"step": self.step, "order": self.order, "generator": self.gen.get_state(),
                "augment_generator": None if self.aug_gen is None else self.aug_gen.get_state(),
                "augment_device": None if self.aug_gen is None else self.aug_gen.device.type,
                "attributes": method.epoch_state(), "loss_sum": float(self.loss_sum), "steps": self.steps,
                "skipped": self.skipped, "targets_time": self.targets_time,
                "time": time.perf_counter() - self.started}


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) in the epoch's order of each global batch; a last batch of one sample is dropped (BN needs 2)."""
    return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size) if min(a + batch_size, n) - a > 1]


def start_cursor(run: Run, ctx: EpochContext, aug_gen: torch.Generator | None) -> EpochCursor:
    """A fresh epoch: the method's targets and sample order (rank 0's for every rank under torchrun)."""
    t0 = time.perf_counter()
    order = run.method.before_epoch(ctx)
    targets_time = time.perf_counter() - t0
    if order is None:
        order = torch.randperm(len(run.images), generator=ctx.generator)
    if distributed.world_size() > 1:  # replicas never drift apart (e.g. by float ties)
        order = order.to(run.device)
        distributed.broadcast_([order])
        distributed.broadcast_state(run.method)
    return EpochCursor(order.cpu(), 0, ctx.generator, aug_gen, torch.zeros((), device=run.device),
                       targets_time=targets_time, started=t0)


def resume_cursor(run: Run, mid: dict[str, Any], ctx: EpochContext, aug_gen: torch.Generator | None,
                  bounds: list[tuple[int, int]]) -> EpochCursor:
    """The epoch a checkpoint was taken inside: its targets and order as they were, the generators where they
    stood. An augmentation generator of another device (a checkpoint moved between CPU and GPU) cannot take
    the saved state: the draws of the steps already run are replayed on this device's generator instead."""
    ctx.generator.set_state(mid["generator"])
    run.method.load_epoch_state(mid["attributes"])
    step = mid["step"]
    if aug_gen is not None:
        if mid.get("augment_device", "cpu") == aug_gen.device.type:
            aug_gen.set_state(mid["augment_generator"])
        else:
            log.info("the checkpoint's augmentation generator is on %s, this run's on %s: replaying the draws of "
                     "%d steps", mid.get("augment_device", "cpu"), aug_gen.device.type, step)
            augment, (height, width) = Augment(run.data.image_size), run.images.shape[-2:]
            for start, stop in bounds[:step]:
                for view in range(run.method.views):
                    run.method.view_augment(view, augment).draw(stop - start, height, width, aug_gen, run.device)
    return EpochCursor(mid["order"], step, ctx.generator, aug_gen,
                       torch.tensor(mid["loss_sum"], device=run.device), mid["steps"], mid["skipped"],
                       mid["targets_time"], time.perf_counter() - mid["time"])


def images_on_device(run: Run) -> bool:
    """Whether the step reads its pixels straight from ``run.images`` (in memory, on the training device, no
    workers): then each batch is a slice of the epoch's order, already on the device."""
    images = run.images
    return torch.is_tensor(images) and images.device.type == run.device.type and run.cfg.num_workers == 0


def epoch_batches(run: Run, cursor: EpochCursor, bounds: list[tuple[int, int]], parts: list[slice],
                  seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """From ``cursor.step`` on: each step's uint8 pixels and sample ids on the device, and the ids on the host.
    Images on the device are indexed with slices of the order uploaded once an epoch, here, before the step loop
    and its sync check (from pinned memory, not waited for); nothing crosses per step. Otherwise a DataLoader
    (workers, a disk cache or host memory; pinned for a GPU) fetches them."""
    rows = [(a + p.start, a + p.stop) for (a, _), p in zip(bounds, parts, strict=True)]  # this rank's rows
    if images_on_device(run):
        order = host_to_device(cursor.order, run.device)
        return slices_of_order(run.images, order, cursor.order.numpy(), rows[cursor.step:])
    batches = [cursor.order[lo:hi].tolist() for lo, hi in rows[cursor.step:]]
    loader = torch.utils.data.DataLoader(IndexedImages(run.images), batch_sampler=batches,
                                         num_workers=run.cfg.num_workers, collate_fn=keep_batch,
                                         pin_memory=run.device.type == "cuda" and torch.cuda.is_available(),
                                         worker_init_fn=ignore_stop_signals,  # worker seeds from the epoch's
                                         generator=torch.Generator().manual_seed(seed))  # not the global RNG
    return ((pixels.to(run.device, non_blocking=True), index.to(run.device, non_blocking=True), index.numpy())
            for pixels, index in start_workers(loader))


def slices_of_order(images: torch.Tensor, order: torch.Tensor, host_order: np.ndarray,
                    rows: list[tuple[int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    for lo, hi in rows:
        index = order[lo:hi]
        yield images[index], index, host_order[lo:hi]


def make_batch(method: Method, augment: Augment, pixels: torch.Tensor, index: torch.Tensor, host_index: np.ndarray,
               size: int, part: slice, aug_gen: torch.Generator | None, channels_last: bool) -> Batch:
    """A step's augmented views. Each view's parameters are drawn for the whole global batch of ``size`` (so
    a split batch is augmented as in one process) and this rank's ``part`` applied; a view the method needs
    only for some rows (``view_rows``) is augmented for just those."""
    height, width = pixels.shape[-2:]
    views, view_rows = [], []
    for view in range(method.views):
        view_aug = method.view_augment(view, augment)  # multi-crop: a small crop for the views after the large
        draw = view_aug.draw(size, height, width, aug_gen, pixels.device).rows(part)
        rows = method.view_rows(view, index, host_index)
        views.append(view_aug.apply(pixels, draw) if rows is None else view_aug.apply(pixels[rows], draw.rows(rows)))
        view_rows.append(rows)
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    clean = test_transform(pixels, augment.size, augment.mean, augment.std) if method.clean_view else None
    return Batch(views, index, clean, view_rows)


def train_step(run: Run, batch: Batch, size: int, guard: LossGuard, step: int, amp: torch.dtype | None,
               learn: bool = True) -> torch.Tensor | None:
    """Loss, backward, optimiser step, then the method's ``after_step`` on the global batch; nothing is read
    on the host (but with nan_policy=skip). Returns the global batch's loss (None: a skipped step).
    ``learn=False`` runs no backward or optimiser step (the fake-CUDA test, which cannot run backward)."""
    world = distributed.world_size()
    with torch.autocast(run.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None), \
            torch.set_grad_enabled(learn):
        loss, outputs = run.model(batch)
    if world > 1:  # DDP averages the ranks' gradients: weight each rank's mean by its share of the batch
        loss = loss * (len(batch.index) * world / size)
        global_loss = distributed.all_reduce_sum(loss.detach().clone()) / world  # every rank sees a NaN
    else:
        global_loss = loss.detach()
    if not guard.ok(global_loss, step):
        return None
    if learn:
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
    if world > 1:  # every rank applies the whole global batch's update to its replica of the state
        outputs = {k: distributed.gather_batch_rows(v.detach()) for k, v in outputs.items()}
        batch = Batch([], distributed.gather_batch_rows(batch.index))
    run.method.after_step(batch, outputs)
    return global_loss


def run_steps(run: Run, cursor: EpochCursor, batches: Iterable[tuple[torch.Tensor, torch.Tensor, np.ndarray]],
              bounds: list[tuple[int, int]], augment: Augment, guard: LossGuard, amp: torch.dtype | None,
              at_step: Callable[[int, bool], None], learn: bool = True) -> None:
    """The step loop of an epoch: each step's views, loss and update, then ``at_step(steps done, stopping)`` (the
    trainer's checkpoints and stop). Under DEEPCLUST_SYNC_DEBUG on a GPU any host-device sync in it fails;
    ``tests/test_fake_cuda.py`` runs it for every method on fake CUDA tensors."""
    with sync_debug(run.device):
        for pixels, index, host_index in batches:
            step = cursor.step
            size = bounds[step][1] - bounds[step][0]
            part = distributed.split_batch(size)
            batch = make_batch(run.method, augment, pixels, index, host_index, size, part, cursor.aug_gen,
                               run.cfg.channels_last)
            loss = train_step(run, batch, size, guard, step, amp, learn)
            if loss is None:
                cursor.skipped += 1
            else:
                cursor.loss_sum += loss
                cursor.steps += 1
            cursor.step = done = step + 1
            at_step(done, stop_agreed(done, len(bounds), run.device))


def stop_agreed(done: int, steps: int, device: torch.device) -> bool:
    """Whether to stop after step ``done``: at SIGTERM / SIGINT; under torchrun only at steps every rank checks
    together (every ``STOP_CHECK_EVERY`` and the last), so that all stop after the same step."""
    if distributed.world_size() == 1:
        return STOP.signum is not None
    if done % STOP_CHECK_EVERY and done != steps:
        return False
    with allow_sync():
        stopping = distributed.any_rank(STOP.signum is not None, device)
    if stopping and STOP.signum is None:
        STOP.signum = signal.SIGTERM  # another rank was stopped
    return stopping


def sync_debug(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """With DEEPCLUST_SYNC_DEBUG=warn|error on a GPU, torch warns or raises at any host-device sync in the step
    loop (the GPU tests set it; ``allow_sync`` exempts the loop's deliberate ones)."""
    mode = os.environ.get("DEEPCLUST_SYNC_DEBUG")
    return sync_debug_mode(mode) if mode and device.type == "cuda" else contextlib.nullcontext()
