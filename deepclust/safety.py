"""What a long run needs to survive schedulers and machines: one run per folder, a graceful stop on
SIGTERM / SIGINT, and a stop (or skip) on a non-finite loss. Small helpers the trainer calls; nothing
here knows about methods.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .runtime import allow_sync

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class RunError(RuntimeError):
    """A run cannot start or go on; the message names the problem and the fix."""


class LockError(RunError):
    """Another live run holds the output folder."""


class NumericalError(RunError):
    """The loss became NaN or infinite."""


class RunInterrupted(RunError):
    """SIGTERM or SIGINT arrived; the run stopped after its current step. ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):  # vanished, empty, or torn by a crash while it was written
        return None


def lock_file(path: Path) -> int | None:
    """An fd of ``path`` holding an exclusive flock, or None when a live process holds it. The kernel drops
    the flock when its holder dies, even by SIGKILL: a lock is never stale, whatever the pid says."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and our flock: lock the new one


@contextmanager
def hold_folder(out: Path) -> Iterator[Path]:
    """Hold ``out`` for this process: an flock on OUT/train.lock, which names our pid and host.

    A folder a live process holds is refused, naming it. A lock file left by a dead run on this host is
    taken over. One written on another host is refused (whether its flock reaches this host depends on the
    file system), with how to remove it.
    """
    out.mkdir(parents=True, exist_ok=True)
    path, host = out / LOCK_NAME, socket.gethostname()
    try:
        fd = lock_file(path)
    except ImportError:  # no fcntl (Windows)
        log.warning("no file locks on this platform: nothing stops a second run into %s", out)
        yield path
        return
    holder = read_lock(path)
    if fd is None:
        holder = holder or {}
        raise LockError(f"{out} is held by a live run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                        f"since {holder.get('since', '?')}); wait for it, stop it, or use another --out")
    try:
        if holder is not None and holder.get("host") != host:
            raise LockError(f"{out} is held by a run on host {holder.get('host')} (pid {holder.get('pid')}, since "
                            f"{holder.get('since')}); use another --out, or delete {path} if that run is dead")
        if holder is not None:
            log.warning("taking over the lock %s left by a run that ended without removing it (%s)", path, holder)
        me = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)  # still under our flock; a process that opened it meanwhile retries
    finally:
        os.close(fd)


@contextmanager
def disk_full_is_a_run_error(out: Path) -> Iterator[None]:
    """A full disk (or quota) while writing metrics or config is a RunError saying what survives."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise RunError(f"the disk is full under {out} ({err}); the last checkpoint there is intact. Free space and "
                       "run again with --resume") from err


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def start_workers(loader: torch.utils.data.DataLoader) -> Iterator:
    """``iter(loader)`` with SIGTERM / SIGINT blocked while its worker processes start, so that a signal sent to
    the whole job or process group (SLURM, a terminal) cannot kill a worker before ``ignore_stop_signals`` ran in
    it; the main process receives its own as soon as they are started."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker leaves SIGTERM / SIGINT to the main process, which stops after its step and shuts
    the workers down (torch's own SIGTERM handler would make the worker die and fail the step)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by start_workers; pending ones drop


class StopRequest:
    """Set by SIGTERM / SIGINT while ``stop_on_signals`` is active; the trainer checks it between steps."""

    signum: int | None = None


STOP = StopRequest()


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn SIGTERM and SIGINT into a request to stop after the current step (a second one stops at once).

    Only the main thread may install handlers; elsewhere this does nothing.
    """
    STOP.signum = None
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return

    def request(signum, frame):
        if STOP.signum is not None:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        STOP.signum = signum
        log.warning("%s received: stopping after the current step (send it again to stop at once)",
                    signal.Signals(signum).name)

    previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield STOP
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        STOP.signum = None


def raise_if_stopping(where: str, checkpoint: Path, resume_epoch: int, resume_step: int | None = None) -> None:
    """After a step: if a stop was requested, raise RunInterrupted saying how to resume."""
    if STOP.signum is None:
        return
    name = signal.Signals(STOP.signum).name
    at = (f"epoch {resume_epoch} (an unfinished epoch is redone, so the result equals an uninterrupted run)"
          if resume_step is None else f"epoch {resume_epoch}, step {resume_step} (where it stopped)")
    raise RunInterrupted(f"stopped by {name} at {where}. {checkpoint} resumes at {at}: run the same command "
                         "with --resume", STOP.signum)


class LossGuard:
    """Checks every step's loss for NaN / inf.

    With policy 'stop' ``ok`` reads nothing: it keeps, on the device, whether any loss since the last check was
    non-finite and the first such step and value. They are read (one sync) every ``check_every`` steps, at a
    checkpoint and at the epoch's end (``finish``), which raises NumericalError naming the first bad step and the
    checkpoint kept: a GPU never waits for the loss, and a run never saves a state a bad step touched. With
    'skip' ``ok`` must know now whether to apply the step: one host sync a step, and False skips it.
    """

    def __init__(self, policy: str, checkpoint: Path, describe: Callable[[int], str], check_every: int = 100):
        self.policy, self.checkpoint, self.describe, self.check_every = policy, checkpoint, describe, check_every
        self.first_bad: torch.Tensor | None = None  # step of the first non-finite loss since the last check, or -1
        self.bad_value: torch.Tensor | None = None
        self.unchecked = 0

    def ok(self, loss: torch.Tensor, step: int) -> bool:
        loss = loss.detach()
        if self.policy == "skip":
            if bool(torch.isfinite(loss).all()):
                return True
            log.warning("non-finite loss (%s) at %s: step skipped (nan_policy=skip)", float(loss), self.describe(step))
            return False
        new_bad = ~torch.isfinite(loss).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.bad_value = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = new_bad & (self.first_bad < 0)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.bad_value = torch.where(first, loss.float().reshape(()), self.bad_value)
        self.unchecked += 1
        if self.unchecked >= self.check_every:
            self.finish()
        return True

    def finish(self) -> None:
        """Read what the steps since the last check left (one sync); raise NumericalError if any was bad."""
        if self.first_bad is None:
            return
        with allow_sync():
            step, value = int(self.first_bad), float(self.bad_value)
        self.first_bad = self.bad_value = None
        self.unchecked = 0
        if step < 0:
            return
        kept = (f"the last good checkpoint {self.checkpoint} is kept" if self.checkpoint.exists()
                else "no checkpoint was written")
        raise NumericalError(f"non-finite loss ({value}) at {self.describe(step)}; {kept}. Lower lr, or pass "
                             "nan_policy=skip to skip such steps (they are counted in metrics.jsonl as skipped_steps)")
