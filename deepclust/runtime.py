"""What the process may use of the machine: CPU threads chosen against the jobs already running, the
memory left, and whether bf16 autocast is native on the training device."""

from __future__ import annotations

import logging
import os
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
    """bf16 autocast is worth it: on CUDA, and on a CPU with AVX512-BF16 or AMX instructions.

    On such a CPU the ConvNet's training step ran 1.6x faster than fp32 (BENCHMARKS.md); without them bf16
    is emulated and slower, so such CPUs stay in fp32.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
