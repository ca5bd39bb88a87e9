"""What the process may use of the machine: CPU threads chosen against the jobs already running, the
memory left, whether bf16 autocast is native on the training device, and the CUDA settings and host-to-device
copies that keep a GPU from waiting."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_threads(requested: int | None) -> int:
    """Set and return torch's intra-op threads.

    ``requested`` wins. Otherwise an OMP_NUM_THREADS the user exported is kept, and without one the
    threads are the cores the other jobs leave free (1-minute load average), at least 1: torch's default
    of one thread per core made jobs that share 2 cores 10-50x slower each, not 2-3x.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be at least 1, got {requested}")
        torch.set_num_threads(requested)
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = available_cores()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, min(cores, round(cores - busy)))
    if free < torch.get_num_threads():
        log.warning("other jobs keep %.1f of %d cores busy: using %d torch thread(s) instead of %d "
                    "(set threads=N to choose)", busy, cores, free, torch.get_num_threads())
        torch.set_num_threads(free)
    return torch.get_num_threads()


def available_memory() -> int | None:
    """Bytes this process can still allocate: the OS's MemAvailable, capped by a cgroup v2 limit (SLURM,
    Kubernetes, Docker) where one is set; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def native_bf16(device: torch.device) -> bool:
    """bf16 autocast is worth it: on a GPU with native bf16 (compute capability 8.0 or newer: A100, H100, RTX 30xx
    on; not V100 or T4, where it is emulated), and on a CPU with AVX512-BF16 or AMX instructions.

    On such a CPU the ConvNet's training step ran 1.6x faster than fp32 (BENCHMARKS.md); without them bf16
    is emulated and slower, so such CPUs (and such GPUs) stay in fp32.
    """
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(device: torch.device, requested: bool) -> torch.dtype | None:
    """The autocast dtype of a training run: bf16 where ``native_bf16``, else None (float32), logged on a GPU
    without bf16. fp16 is not offered: the memory-bank softmax and the IS loss need bf16's range."""
    if not requested:
        return None
    if native_bf16(device):
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_available():
        log.warning("this GPU (compute capability %d.%d) has no native bf16: training in float32 (amp=false "
                    "silences this)", *torch.cuda.get_device_capability(device))
    return None


def configure_device(device: torch.device, deterministic: bool = False) -> None:
    """Fast CUDA settings for the network: TF32 matmuls and convolutions (10-bit mantissa products, float32 sums;
    the clustering, evaluation and bank products opt out with ``exact_float32``) and cuDNN's autotuner, which
    picks per input shape and so is off when ``deterministic`` asks for repeatable results. Nothing on a CPU."""
    if device.type != "cuda":
        return
    if deterministic:  # cuBLAS refuses deterministic mode without a fixed workspace; set before its first handle
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not deterministic


@contextmanager
def flag_set(owner: object, name: str, value: bool) -> Iterator[None]:
    """``owner.name`` (a torch.backends flag) set to ``value`` while inside, then restored. Host-only (no sync);
    inside a compiled region nothing is changed: the compiled graph's own setting applies."""
    if torch.compiler.is_compiling():
        yield
        return
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def exact_float32() -> contextlib.AbstractContextManager[None]:
    """float32 matrix products in full float32 while inside, where ``configure_device`` allows TF32 (10-bit
    mantissa products, about 1e-3 relative error) for the network: k-means assignments, the kNN evaluation, PCA
    and the memory bank's logits (f . m / tau) would otherwise move with it."""
    return flag_set(torch.backends.cuda.matmul, "allow_tf32", False)


def fixed_algorithms() -> contextlib.AbstractContextManager[None]:
    """cuDNN's autotuner off while inside, for a forward whose row count changes from step to step (PAD's second
    view, of the batch's isolated samples): with ``benchmark`` on, every new row count would time each layer's
    algorithms again, up to a batch size's worth of autotuning an epoch."""
    return flag_set(torch.backends.cudnn, "benchmark", False)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: from pinned memory when a GPU is there (a
    copy from pageable memory makes the host wait for the stream)."""
    if device.type == "cuda" and torch.cuda.is_available():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@contextmanager
def sync_debug_mode(mode: int | str) -> Iterator[None]:
    """torch's check for host-device syncs (``torch.cuda.set_sync_debug_mode``: 0 / "warn" / "error") set to
    ``mode`` while inside, then restored; nothing to do without a visible GPU."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def allow_sync() -> contextlib.AbstractContextManager[None]:
    """A host-device sync the step loop makes on purpose (the loss check every so many steps, a checkpoint, a
    once-an-epoch table): exempt from DEEPCLUST_SYNC_DEBUG's check while inside."""
    return sync_debug_mode(0)
