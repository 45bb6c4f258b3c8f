"""What a node reports about its resources (dispy's DispyNodeAvailInfo), via psutil."""

from __future__ import annotations

import contextlib

import psutil


def avail_info(path: str) -> list[float]:
    """``[cpu %, memory bytes, disk bytes, swap %]`` available now.

    CPU availability is measured since the previous call (the first call after start
    compares with process start), so calling this periodically costs nothing.
    Each figure that cannot be read now (no descriptor left to open ``/proc``
    with) is 0: a node short of descriptors still answers and pulses.
    """
    cpu = memory = disk = swap_free = 0.0
    with contextlib.suppress(OSError):
        cpu = max(0.0, 100.0 - psutil.cpu_percent(interval=None))
    with contextlib.suppress(OSError):
        memory = float(psutil.virtual_memory().available)
    with contextlib.suppress(OSError):
        disk = float(psutil.disk_usage(path).free)
    with contextlib.suppress(OSError):
        swap = psutil.swap_memory()
        swap_free = 100.0 - swap.percent if swap.total else 0.0
    return [cpu, memory, disk, swap_free]
