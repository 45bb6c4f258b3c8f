"""What a node reports about its resources (dispy's DispyNodeAvailInfo), via psutil."""

from __future__ import annotations

import psutil


def avail_info(path: str) -> list[float]:
    """``[cpu %, memory bytes, disk bytes, swap %]`` available now.

    CPU availability is measured since the previous call (the first call after start
    compares with process start), so calling this periodically costs nothing.
    """
    cpu = max(0.0, 100.0 - psutil.cpu_percent(interval=None))
    memory = float(psutil.virtual_memory().available)
    try:
        disk = float(psutil.disk_usage(path).free)
    except OSError:
        disk = 0.0
    swap = psutil.swap_memory()
    swap_free = 100.0 - swap.percent if swap.total else 0.0
    return [cpu, memory, disk, swap_free]
