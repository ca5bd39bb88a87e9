"""How much CPU other processes took while a measurement ran (Linux: /proc/stat; elsewhere unknown).

A timing taken while other processes compete for the cores is inflated, and multi-threaded torch /
OpenMP kernels on small tensors suffer most. ``CpuWatch`` reports the cores' busy time that was not
this process's own (nor its waited-for children's), as an average number of cores.
"""

from __future__ import annotations

import os
import time


def busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """``other_cores()``: average cores used by other processes since construction (None if unknown)."""

    def __init__(self):
        self.wall, self.busy, self.own = time.perf_counter(), busy_seconds(), own_seconds()

    def other_cores(self) -> float | None:
        busy = busy_seconds()
        wall = time.perf_counter() - self.wall
        if busy is None or self.busy is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy) - (own_seconds() - self.own)) / wall


def busy_note(other_cores: float | None, threshold: float = 0.25) -> str | None:
    """A warning when other processes took more than ``threshold`` of a core on average."""
    if other_cores is None or other_cores <= threshold:
        return None
    return (f"machine busy: other processes used {other_cores:.2f} of {os.cpu_count()} cores on average; "
            "times are inflated, small multi-threaded torch ops most of all (compare --threads 1)")
