"""One training loop for every method. It knows nothing method-specific: methods make targets in
``before_epoch`` / ``after_step`` and give a loss.

Every epoch's randomness (sample order, augmentation, k-means seeds) comes from generators seeded by
(seed, round, epoch), and the global RNG state is checkpointed, so a resumed run repeats exactly
what the uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from . import distributed
from .augment import Augment
from .backbones import Backbone
from .board import TensorBoardLog, open_board
from .checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, as_dict
from .data import load_train_test
from .device_memory import check_device_memory, check_host_memory, check_host_step, plan_training_memory
from .epoch import (
    batch_bounds,
    epoch_batches,
    resume_cursor,
    run_steps,
    start_cursor,
)
from .eval import extract_features, knn_accuracy
from .methods import METHODS
from .methods.base import EpochContext
from .optim import make_optimizer
from .run import Run
from .run_folder import check_same_config, claim_folder, resume_from_checkpoint
from .runtime import allow_sync, autocast_dtype, choose_threads, configure_device
from .safety import (
    LossGuard,
    RunInterrupted,
    disk_full_is_a_run_error,
    hold_folder,
    raise_if_stopping,
    stop_on_signals,
)

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def epoch_seed(seed: int, round_: int, epoch: int) -> int:
    return (seed * 1_000 + round_) * 100_000 + epoch


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The lr of ``epoch`` of a round (every schedule restarts each round). step: x lr_decay at each fraction in
    lr_decay_at; linear: from lr down to lr / epochs in the last epoch (UIC's recipe); cosine: half a cosine.
    ``warmup_epochs``: first a linear rise, lr (e + 1) / (warmup + 1) in epoch e, then the schedule."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1 - epoch / cfg.epochs)
    if cfg.lr_schedule == "cosine":  # after a warm-up, over the epochs left (solo-learn's warmup_cosine)
        w = cfg.warmup_epochs
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - w) / (cfg.epochs - w)))
    steps = sum(epoch >= math.ceil(f * cfg.epochs) for f in cfg.lr_decay_at)
    return cfg.lr * cfg.lr_decay**steps


def backbone_spec(cfg: TrainConfig) -> dict[str, Any]:
    """What must match between a checkpoint's backbone and this config's for its weights to load."""
    return {"name": cfg.backbone, "width": cfg.width, "sobel": cfg.sobel, "embed_dim": cfg.embed_dim}


def setup(cfg: TrainConfig, hparams: Any, resume: bool = False) -> Run:
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    payload = None
    if resume:
        payload = load_checkpoint(ckpt_path)
        check_compatible(payload, cfg.method, backbone_spec(cfg), ckpt_path)
        check_same_config(payload, as_dict(cfg, hparams), ckpt_path)  # before any data is read
    threads = choose_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = distributed.initialise(resolve_device(cfg.device))
    if cfg.deterministic:  # CUDA's average-pool backward has no deterministic kernel: warned about, not refused
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    configure_device(device, cfg.deterministic)
    world = distributed.world_size()
    if cfg.batch_size < 2 * world:
        raise ConfigError(f"batch_size {cfg.batch_size} is too small for {world} processes: each needs at least 2 "
                          f"images of every batch; use batch_size >= {2 * world} or fewer processes")
    amp = autocast_dtype(device, cfg.amp)  # once a run: it logs a GPU without bf16
    where = f"the CPU with {threads} torch thread(s)" if device.type == "cpu" else str(device)
    log.info("training on %s, %s", where, "bf16 autocast" if amp else "float32")
    if device.type == "cpu" and cfg.image_size:  # a step that cannot fit is refused before any file is decoded
        check_host_step(cfg.backbone, cfg.image_size, cfg.batch_size, METHODS[cfg.method].views, amp is not None,
                        cfg.width, cfg.sobel)
    data, test = load_train_test(cfg.data, cfg.test_data, cfg.image_size, cfg.bad_images, cfg.subset,
                                 cfg.test_subset, cfg.subset_imbalance, backbone=cfg.backbone, labels=cfg.labels)
    if payload is not None and payload["num_samples"] != len(data):
        raise CheckpointError(f"{ckpt_path} was trained on {payload['num_samples']} samples, --data has "
                              f"{len(data)}; resume with the same data")
    method_cls = METHODS[cfg.method]
    backbone = Backbone(cfg.backbone, data.image_size, cfg.embed_dim, cfg.sobel, cfg.width)
    if cfg.init and payload is None:  # any backbone file: a checkpoint, an export, a torchvision / timm state_dict
        from .backbone_files import init_backbone

        init_backbone(backbone, cfg.init, backbone_spec(cfg), data.image_size)
    method = method_cls(backbone, len(data), hparams, labels=data.labels if method_cls.uses_labels else None)
    images_fit = True
    plan = plan_training_memory(method, len(data), data.image_size, cfg.batch_size, amp is not None)
    if device.type == "cuda":  # before anything is copied there
        images_fit = check_device_memory(plan, device)
    else:  # before the first step: a run that outgrows memory is killed without a word
        check_host_memory(plan, method.views, cfg.batch_size, data.image_size, torch.is_tensor(data.images))
    if world > 1:  # BatchNorm statistics over the global batch, as one process would compute them
        distributed.global_batchnorm(method)
    method.to(device)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optimizer, method.param_groups(), cfg.lr, cfg.momentum, cfg.weight_decay)
    model = None
    if world > 1:  # the bank and labels are replicated and updated from gathered steps, never broadcast per step
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync(),
            find_unused_parameters=True)  # e.g. the embedding head of methods that train on pooled features
    if cfg.compile:  # the forward through the loss; augmentation, after_step and targets stay eager
        model = torch.compile(model or method)
    run = Run(cfg, hparams, method, optimizer, data, test, device, out, model=model, images_fit=images_fit,
              amp=amp)
    if payload is not None:
        method.load_state_dict(payload["state"])
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"]["torch"])
        restore_cuda_rng(payload["rng"].get("cuda"), device)
        run.start, run.mid_epoch = payload["next_epoch"], payload.get("mid_epoch")
        log.info("resuming %s at epoch %d%s", ckpt_path, run.start,
                 f", step {run.mid_epoch['step']}" if run.mid_epoch else "")
    return run


def no_buffer_sync() -> dict[str, bool]:
    """DDP's keyword for "never broadcast buffers at forward": ``forward_sync_buffers`` since torch 2.14, before
    it ``broadcast_buffers`` (now deprecated)."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def restore_cuda_rng(state: torch.Tensor | list[torch.Tensor] | None, device: torch.device) -> None:
    """The CUDA generator of this process's GPU, from a checkpoint (older ones hold a list, one per visible GPU:
    their first, or this index's). A CPU run, or a checkpoint of a CPU run, leaves it as seeded."""
    if state is None or device.type != "cuda":
        return
    if isinstance(state, (list, tuple)):
        state = state[min(device.index or 0, len(state) - 1)]
    torch.cuda.set_rng_state(state, device)


def feature_pass(run: Run, images: torch.Tensor, feature: str, normalize: bool = True,
                 bf16: bool | None = None) -> torch.Tensor:
    """Features of every image (eval mode, no augmentation); under torchrun each rank computes its part."""
    return distributed.sharded_rows(
        lambda rows: extract_features(run.method.backbone, images[rows], feature, device=run.device,
                                      image_size=run.data.image_size, normalize=normalize, bf16=bf16),
        len(images))


def evaluate_knn(run: Run) -> float | None:
    """Weighted kNN top-1 on the test set (train features recomputed without augmentation)."""
    if run.test is None or run.test.labels is None or run.data.labels is None:
        return None
    test, train = (feature_pass(run, d.images, run.eval_feature) for d in (run.test, run.data))
    return knn_accuracy(test, run.test.labels.to(run.device), train, run.data.labels.to(run.device),
                        run.cfg.knn_k, run.cfg.knn_tau)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
    """Forget momentum buffers of ``module``'s parameters (for heads a method re-initialises)."""
    for p in module.parameters():
        optimizer.state.pop(p, None)


def run_epoch(run: Run, global_epoch: int) -> dict[str, Any]:
    cfg, method, device = run.cfg, run.method, run.device
    round_, epoch = divmod(global_epoch, cfg.epochs)
    seed = epoch_seed(cfg.seed, round_, epoch)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed)
    amp = run.amp

    def extract(feature: str, normalize: bool = True) -> torch.Tensor:  # targets: in the precision training runs
        return feature_pass(run, run.images, feature, normalize, bf16=amp is not None)

    ctx = EpochContext(round_, epoch, cfg.epochs, cfg.rounds, seed, gen, device, extract,
                       run.data.labels, lambda m: reset_optimizer_state(run.optimizer, m))
    mid, run.mid_epoch = run.mid_epoch, None
    bounds = batch_bounds(len(run.images), cfg.batch_size)
    if mid is None:
        cursor = start_cursor(run, ctx, aug_gen)
    else:
        cursor = resume_cursor(run, mid, ctx, aug_gen, bounds)
    parts = [distributed.local_part(stop - start) for start, stop in bounds]  # this rank's rows of each batch
    lr = lr_at(cfg, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr if group.get("scheduled", True) else cfg.lr
    augment = Augment(run.data.image_size, compiled=cfg.compile,  # compile=true: the augmentation too
                      mean=method.backbone.mean, std=method.backbone.std)  # a timm model's own
    method.train()
    checkpoint = run.out / "checkpoint.pt"

    def where(step: int) -> str:
        return f"round {round_} epoch {epoch} step {step} of {cfg.method}"

    guard = LossGuard(cfg.nan_policy, checkpoint, where)
    batches = tqdm(epoch_batches(run, cursor, bounds, parts, seed), desc=f"round {round_} epoch {epoch}",
                   total=len(bounds) - cursor.step, leave=False, disable=not cfg.progress)

    def at_step(done: int, stopping: bool) -> None:
        if cfg.checkpoint_every and (stopping or (done % cfg.checkpoint_every == 0 and done < len(bounds))):
            with allow_sync():
                guard.finish()  # a non-finite step is never checkpointed
                if distributed.is_main():
                    save_checkpoint(checkpoint, {**run.payload(global_epoch), "mid_epoch": cursor.state(method)})
        if stopping:  # without checkpoint_every, the epoch's checkpoint is the one before it
            raise_if_stopping(where(done - 1), checkpoint, global_epoch, done if cfg.checkpoint_every else None)

    run_steps(run, cursor, batches, bounds, augment, guard, amp, at_step)
    guard.finish()
    row: dict[str, Any] = {"round": round_, "epoch": epoch, "global_epoch": global_epoch,
                           "loss": float(cursor.loss_sum) / max(1, cursor.steps), "lr": lr}
    if cfg.nan_policy == "skip":
        row["skipped_steps"] = cursor.skipped
    row.update(method.after_epoch(ctx))
    row["time"] = time.perf_counter() - cursor.started
    row["targets_time"] = cursor.targets_time
    return row


def host_copy(obj: Any) -> Any:
    """A copy of a nested payload with every tensor cloned into host memory (the run's starting state, kept
    for a stop before the first checkpoint, must not double the method's state on the GPU)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


def write_metrics(path: Path, row: dict[str, Any], board: TensorBoardLog | None = None) -> None:
    """One write of a whole line: a crash or a full disk can tear at most the last line, which reads skip."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
    if board is not None:
        board.write(row)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of complete lines; a last line without its newline (torn by a crash) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    if lines[-1]:
        log.warning("%s: dropping a torn last line (%d characters)", path, len(lines[-1]))
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def truncate_metrics(path: Path, next_epoch: int) -> None:
    """Drop rows of epochs that the checkpoint does not hold (written just before a crash)."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if r.get("global_epoch", -1) < next_epoch]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)  # a crash while rewriting never loses the rows kept


def train(cfg: TrainConfig, hparams: Any, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume) a run in ``cfg.out``; returns the last metrics row.

    The folder is locked against a second run. A folder that holds a run is refused unless ``resume``
    (continue it; with no checkpoint yet, start from the beginning) or ``overwrite`` (move it aside to
    OUT.1). SIGTERM / SIGINT stop the run after its current step with RunInterrupted; the last epoch's
    checkpoint (on an interrupted first epoch: the initial state) resumes it.
    """
    main = distributed.launch_rank() == 0  # only rank 0 writes the folder
    with hold_folder(Path(cfg.out)) if main else contextlib.nullcontext(), stop_on_signals(), \
            disk_full_is_a_run_error(Path(cfg.out)):
        if main:  # under the lock (no live run is moved aside), before any data is read
            claim_folder(Path(cfg.out), resume, overwrite)
        return train_in_folder(cfg, hparams, resume)


def train_in_folder(cfg: TrainConfig, hparams: Any, resume: bool) -> dict[str, Any]:
    resume = resume_from_checkpoint(Path(cfg.out), resume)  # no checkpoint yet: the same as a fresh start
    run = setup(cfg, hparams, resume)
    main = distributed.is_main()
    metrics_path = run.out / "metrics.jsonl"
    board = None
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        if resume:
            truncate_metrics(metrics_path, run.start)
        else:
            metrics_path.unlink(missing_ok=True)
        with open(run.out / "config.yaml", "w") as f:
            yaml.safe_dump(as_dict(cfg, hparams), f, sort_keys=False)
        board = open_board(cfg.logger, run.out)

    def write_row(row: dict[str, Any]) -> None:
        if main:
            write_metrics(metrics_path, row, board)

    def save(next_epoch: int, payload: dict[str, Any] | None = None) -> None:
        if main:
            save_checkpoint(run.out / "checkpoint.pt", payload or run.payload(next_epoch))
    total = cfg.epochs * cfg.rounds if run.method.trains else 0
    stop = total if cfg.stop_after is None else min(total, cfg.stop_after)
    # for a stop in epoch 0 before any checkpoint (with checkpoint_every, the stop itself writes one)
    initial = host_copy(run.payload(0)) if run.start == 0 and total > 0 and not cfg.checkpoint_every else None
    # Rank 0 decides (it may already be writing the file): every rank must join the evaluation or none.
    has_baseline = distributed.any_rank(main and any(r.get("untrained") for r in read_metrics(metrics_path)),
                                        run.device)
    if run.start == 0 and total > 0 and not has_baseline:  # the network before training: the baseline
        untrained = evaluate_knn(run)
        if untrained is not None:
            write_row({"round": 0, "epoch": -1, "global_epoch": -1, "knn_top1": untrained, "untrained": True})
    row: dict[str, Any] = {}
    for global_epoch in range(run.start, stop):
        try:
            row = run_epoch(run, global_epoch)
        except RunInterrupted:
            if initial is not None:  # stopped before this run's first checkpoint: save where it started
                save(0, initial)
            raise
        initial = None
        last = global_epoch == total - 1  # not stop - 1: an interrupted run logs what the whole run logs
        if last or (cfg.eval_every and (global_epoch + 1) % cfg.eval_every == 0):
            row["knn_top1"] = evaluate_knn(run)
        log.info("epoch %d: %s", global_epoch, {k: round(v, 4) if isinstance(v, float) else v
                                                for k, v in row.items()})
        write_row(row)
        save(global_epoch + 1)
        if global_epoch + 1 < stop:
            raise_if_stopping(f"the end of epoch {global_epoch}", run.out / "checkpoint.pt", global_epoch + 1)
    if total == 0:  # nothing to train (the random-init reference): evaluate and save as is
        row = {"round": 0, "epoch": 0, "global_epoch": 0, "knn_top1": evaluate_knn(run)}
        write_row(row)
        save(0)
    elif not row:  # a finished run resumed: report, change nothing
        row = {"global_epoch": run.start, "knn_top1": evaluate_knn(run)}
    if board is not None:
        board.close()
    distributed.barrier()  # every rank reads the rows rank 0 wrote
    baseline = next((r["knn_top1"] for r in read_metrics(metrics_path) if r.get("untrained")), None)
    return {**row, "knn_untrained": baseline} if baseline is not None else row
