"""What ``train`` does with an output folder that already holds a run: refuse without ``--resume`` or
``--overwrite`` (a repeated command must never replace a finished run), move the old run aside on
``--overwrite``, start from the beginning on ``--resume`` when there is no checkpoint yet (so one command
line serves a first start and every requeue), and refuse a resume whose config differs from the checkpoint's.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .config import ConfigError
from .safety import LOCK_NAME, RunError

log = logging.getLogger(__name__)

CHECKPOINT, METRICS, CONFIG = "checkpoint.pt", "metrics.jsonl", "config.yaml"

# Keys that say where a run computes, how fast, and how often it logs, checkpoints or stops, not what it
# computes: a resumed run may change them (another machine, fewer threads, a later stop). epochs and rounds
# are not among them: the lr schedule (lr_decay_at is a fraction of the epochs) and the round and epoch of
# every global epoch follow from them, so a resume with other values would equal no uninterrupted run. Nor
# is amp: bf16 instead of float32 changes the numbers themselves, not only their last bits as kernels do.
RUN_KEYS = frozenset({"out", "device", "threads", "num_workers", "progress", "logger", "eval_every", "stop_after",
                      "checkpoint_every", "nan_policy", "compile", "channels_last", "deterministic",
                      "init"})  # init: only a fresh start reads it
# None means "derive it from N" for these; the method writes the derived value into the config it records.
DERIVED_COUNTS = ("k", "min_clusters")


class RunFolderError(RunError):
    """The output folder holds a run that this command would replace; the message names it and the ways on."""


def holds_run(out: Path) -> bool:
    """A checkpoint, or a metrics log with at least one row (a run killed before its first checkpoint)."""
    metrics = out / METRICS
    return (out / CHECKPOINT).exists() or (metrics.is_file() and bool(metrics.read_text(errors="replace").strip()))


def aside_path(out: Path) -> Path:
    """The first of OUT.1, OUT.2, ... that does not exist yet."""
    return next(p for i in itertools.count(1) if not (p := out.with_name(f"{out.name}.{i}")).exists())


def metrics_rows(out: Path) -> list[dict[str, Any]]:
    """The readable rows of OUT/metrics.jsonl (a torn or foreign line is skipped: this only describes the run)."""
    path, rows = out / METRICS, []
    if not path.is_file():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def describe_run(out: Path) -> str:
    """'npid, 10 of 10 epochs done, last kNN top-1 92.76%', from the checkpoint, config.yaml and metrics."""
    config: dict[str, Any] = {}
    done = None
    path = out / CHECKPOINT
    if path.exists():
        try:  # mmap: a many-GB checkpoint is not read just to be described
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            config, done = {**payload.get("config", {}), "method": payload["method"]}, payload["next_epoch"]
        except Exception:  # any unreadable file: say so; the refusal itself stands
            config = {"method": "an unreadable checkpoint.pt"}
    if not config and (out / CONFIG).is_file():
        import yaml

        try:
            config = yaml.safe_load((out / CONFIG).read_text()) or {}
        except yaml.YAMLError:
            config = {}
    rows = metrics_rows(out)
    epochs = [r["global_epoch"] for r in rows if isinstance(r.get("global_epoch"), int) and r["global_epoch"] >= 0]
    parts = [str(config.get("method", "method unknown"))]
    if isinstance(config.get("iterations"), int):  # a transfer run (deepclust.transfer) counts iterations
        unit, total = "iterations", config["iterations"]
    else:
        unit = "epochs"
        total = config.get("epochs", 0) * config.get("rounds", 1) if isinstance(config.get("epochs"), int) else None
    if done is None:
        done = max(epochs) + 1 if epochs else 0
        parts.append(f"{done}{f' of {total}' if total else ''} {unit} logged, no checkpoint yet")
    else:
        parts.append(f"{done}{f' of {total}' if total else ''} {unit} done")
    knn = [r for r in rows if r.get("knn_top1") is not None]
    if knn:
        last = knn[-1]
        parts.append(f"{'untrained' if last.get('untrained') else 'last'} kNN top-1 {last['knn_top1']:.2f}%")
    return ", ".join(parts)


def claim_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Called while holding OUT's lock, before any data is read: refuse to train over a run without
    ``resume`` or ``overwrite``; with ``overwrite`` move the old run aside (never delete it)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite starts it again: pass one of them")
    if not holds_run(out) or resume:
        return
    if not overwrite:
        raise RunFolderError(
            f"{out} already holds a run ({describe_run(out)}). Continue it with --resume, or start again with "
            f"--overwrite (which moves the old run aside to {aside_path(out)}, deleting nothing)")
    aside = aside_path(out)
    aside.mkdir(parents=True)
    for entry in sorted(out.iterdir()):
        if entry.name != LOCK_NAME:  # ours, held for the new run
            shutil.move(str(entry), str(aside / entry.name))  # a rename; a copy only across file systems
    log.warning("--overwrite: moved the run that was in %s aside to %s; starting again", out, aside)


def resume_from_checkpoint(out: Path, resume: bool) -> bool:
    """Whether to load OUT's checkpoint: asked to resume and there is one. Without one (killed before its
    first checkpoint, or never started) the run starts from the beginning, as the same command without --resume."""
    if resume and not (out / CHECKPOINT).exists():
        log.info("--resume: %s has no checkpoint yet (a run stopped before its first one, or never started); "
                 "starting the run from the beginning", out)
        return False
    return resume


def derived_count(key: str, num_samples: int) -> int | None:
    """What None becomes for ``key`` on ``num_samples`` images (the methods' cluster_count), without its log line."""
    from .cluster import cluster_count

    quiet = logging.getLogger(cluster_count.__module__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return cluster_count(None, num_samples, key)
    except Exception:  # no derived value (too few samples): the comparison then names the key
        return None
    finally:
        quiet.setLevel(level)


def config_differences(saved: dict[str, Any], current: dict[str, Any], num_samples: int | None) -> list[str]:
    """'key: X in the checkpoint, Y now' for every key but RUN_KEYS that both configs hold and that differs."""
    diffs = []
    for key, now in current.items():
        if key in RUN_KEYS or key not in saved:  # a key newer than the checkpoint: nothing to compare
            continue
        then = saved[key]
        if now is None and key in DERIVED_COUNTS and isinstance(then, int) and num_samples:
            now_value = derived_count(key, num_samples)
        else:
            now_value = now
        if then != now_value:
            diffs.append(f"{key}: {then!r} in the checkpoint, {now!r} now")
    return diffs


def check_same_config(payload: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint with a config that differs in anything that changes what the run computes."""
    diffs = config_differences(payload.get("config") or {}, current, payload.get("num_samples"))
    if diffs:
        raise CheckpointError(
            f"{path} was trained with another config ({'; '.join(diffs)}); resume with the checkpoint's values, "
            "or start a new run with --overwrite or another --out (--resume may change only the keys that leave "
            f"what the run computes alone: {', '.join(sorted(RUN_KEYS - {'init', 'out'}))})")
