"""A transfer run in its folder, with ``train``'s reliability: the folder locked and never trained over without
--resume / --overwrite (``run_folder``), an atomic checkpoint every ``checkpoint_every`` iterations and on
SIGTERM / SIGINT, a resume that refuses another config and then equals the uninterrupted run (every batch and the
models' own sampling are seeded by the iteration), non-finite losses stopped (``LossGuard``), metrics.jsonl and
config.yaml. Under torchrun the global batch is split over the ranks (DistributedDataParallel); rank 0 writes
the folder and evaluates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import distributed
from ..backbone_files import open_backbone
from ..checkpoint import load_checkpoint, save_checkpoint
from ..run_folder import CHECKPOINT, CONFIG, METRICS, check_same_config, claim_folder, resume_from_checkpoint
from ..safety import (
    STOP,
    LossGuard,
    RunInterrupted,
    disk_full_is_a_run_error,
    hold_folder,
    ignore_stop_signals,
    start_workers,
    stop_on_signals,
)
from ..train import read_metrics, resolve_device, write_metrics
from .config import TransferConfig
from .tasks import build_task

log = logging.getLogger(__name__)


def lr_factor(cfg: TransferConfig, iteration: int) -> float:
    """Detectron2's WarmupMultiStepLR: linear warm-up from ``warmup_factor``, x ``lr_decay`` at each step."""
    decay = cfg.lr_decay ** sum(iteration >= step for step in cfg.lr_steps)
    if iteration < cfg.warmup_iterations:
        alpha = iteration / cfg.warmup_iterations
        return decay * (cfg.warmup_factor * (1 - alpha) + alpha)
    return decay


class Batches(torch.utils.data.Dataset):
    """The task's batches of iterations ``start``..``stop`` - 1, in order, for a DataLoader (workers decode)."""

    def __init__(self, task: Any, start: int, stop: int):
        self.task, self.start, self.stop = task, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        return self.task.batch(self.start + i)


def transfer(cfg: TransferConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune (or resume) in ``cfg.out``; returns the final metrics row (the test metric)."""
    out = Path(cfg.out)
    main = distributed.launch_rank() == 0
    with hold_folder(out) if main else contextlib.nullcontext(), stop_on_signals(), disk_full_is_a_run_error(out):
        if main:
            claim_folder(out, resume, overwrite)
        try:
            return transfer_in_folder(cfg, resume_from_checkpoint(out, resume))
        finally:
            distributed.finish()


def transfer_in_folder(cfg: TransferConfig, resume: bool) -> dict[str, Any]:
    out = Path(cfg.out)
    device = distributed.initialise(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    opened = open_backbone(cfg.checkpoint, cfg.backbone)
    backbone = opened.model.train().to(memory_format=torch.contiguous_format)
    task = build_task(cfg, backbone)
    model = task.model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start, path = 0, out / CHECKPOINT
    if resume:
        payload = load_checkpoint(path)
        check_same_config(payload, cfg.as_dict(), path)
        model.load_state_dict(payload["state"])
        optimizer.load_state_dict(payload["optimizer"])
        start = payload["next_epoch"]
        log.info("resuming %s at iteration %d of %d", path, start, cfg.iterations)
    wrapped = model
    if distributed.world_size() > 1:
        if cfg.norm == "batch":
            wrapped = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    main = distributed.is_main()
    metrics = out / METRICS
    if main:
        out.mkdir(parents=True, exist_ok=True)
        rows = [r for r in read_metrics(metrics) if r.get("iteration", 0) <= start and not r.get("final")] \
            if resume else []
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(out / CONFIG, "w") as f:
            yaml.safe_dump({**cfg.as_dict(), "source": str(opened.file.description)}, f, sort_keys=False)

    def save(next_iteration: int) -> None:
        if main:
            save_checkpoint(path, {"method": f"transfer-{cfg.task}", "next_epoch": next_iteration,
                                   "config": cfg.as_dict(), "state": model.state_dict(),
                                   "optimizer": optimizer.state_dict()})

    stop = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, cfg.stop_after)
    guard = LossGuard(cfg.nan_policy, path, lambda i: f"iteration {i}", check_every=cfg.log_every)
    window: list[dict[str, torch.Tensor]] = []
    began = time.perf_counter()
    wrapped.train()
    loader = torch.utils.data.DataLoader(Batches(task, start, stop), batch_size=None, num_workers=cfg.num_workers,
                                         worker_init_fn=ignore_stop_signals if cfg.num_workers else None,
                                         persistent_workers=False)
    for iteration, batch in zip(range(start, stop), start_workers(loader), strict=True):
        torch.manual_seed(cfg.seed * 1_000_003 + iteration)  # the models' own sampling (RPN, ROI heads, sizes)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, iteration)
        losses = task.loss(wrapped, batch, device)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if guard.ok(loss, iteration):
            loss.backward()
            optimizer.step()
        window.append({"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}})  # read at the log
        done = iteration + 1
        if done % cfg.log_every == 0 or done == stop:
            guard.finish()
            row = {"iteration": done, "lr": optimizer.param_groups[0]["lr"],
                   **{k: float(torch.stack([w[k] for w in window]).float().mean()) for k in window[0]},
                   "time": time.perf_counter() - began}
            log.info("iteration %d: %s", done, {k: round(v, 4) for k, v in row.items()})
            if main:
                write_metrics(metrics, row)
            window = []
        if done % cfg.checkpoint_every == 0 or done == stop:
            guard.finish()
            save(done)
        if STOP.signum is not None and done < stop:
            guard.finish()
            save(done)
            raise RunInterrupted(f"stopped at iteration {done}; {path} resumes there: run the same command with "
                                 "--resume", STOP.signum)
    if stop < cfg.iterations:
        return {"iteration": stop, "stopped": True}
    row: dict[str, Any] = {"iteration": cfg.iterations, "final": True}
    if main:
        began = time.perf_counter()
        row.update(task.evaluate(model, device))
        row["eval_time"] = time.perf_counter() - began
        write_metrics(metrics, row)
        log.info("%s on %s: %s %.2f", cfg.task, task.__class__.__name__, task.metric, row[task.metric])
    distributed.barrier()
    return row
