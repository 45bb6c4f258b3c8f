"""What a node reports about its resources (dispy's DispyNodeAvailInfo).

On Linux the figures are read from ``/proc`` and `os.statvfs`, as psutil reads them
there; elsewhere psutil reads them. A node on Linux does not import psutil: its ten
modules and its C extension took some 0.8 MiB of every node's shared memory and 6 ms
of CPU at each start, for four numbers (issue 17 items 6 and W5).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["avail_info"]

_LINUX = sys.platform.startswith("linux")


def avail_info(path: str) -> list[float | None]:
    """``[cpu %, memory bytes, disk bytes, swap %]`` available now.

    CPU availability is measured since the previous call (the first call after start
    compares with the import of this module), so calling this periodically costs
    nothing.
    Each figure that cannot be read now (no descriptor left to open ``/proc``
    with) is None, unknown: a node short of descriptors still answers and pulses,
    and is not taken for a full node (0% CPU, no memory free). A client shows a
    node with an unknown figure as not reported (``DispyNode.avail_info`` None).
    """
    if not _LINUX:
        return _psutil_avail_info(path)
    return [
        _read(_CPU.available),
        _read(lambda: float(_meminfo()["MemAvailable"])),
        _read(lambda: _disk_free(path)),
        _read(_swap_free),
    ]


def _read(figure: Callable[[], float]) -> float | None:
    """``figure()``, or None if it cannot be read now."""
    try:
        return figure()
    except OSError:
        return None


class _CpuMeter:
    """The share of all CPUs left idle since the previous look (``/proc/stat``)."""

    def __init__(self) -> None:
        try:
            self._last: tuple[int, int] | None = self._ticks()
        except OSError:
            self._last = None

    @staticmethod
    def _ticks() -> tuple[int, int]:
        """(busy, all) clock ticks of all CPUs since boot."""
        with open("/proc/stat", "rb") as fh:
            ticks = [int(tick) for tick in fh.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice]: the
        # guests' time is part of user and nice already. Waiting for I/O is idle.
        spent = sum(ticks[:8])
        return spent - ticks[3] - ticks[4], spent

    def available(self) -> float:
        """Percent of the CPUs' time idle since the previous call, one decimal."""
        busy, spent = now = self._ticks()
        last, self._last = self._last, now
        if last is None or spent <= last[1]:
            return 100.0  # no time passed to measure (psutil says 0% busy then)
        used = max(0, busy - last[0]) / (spent - last[1])
        return round(100.0 - min(100.0, 100.0 * used), 1)


def _meminfo() -> dict[str, int]:
    """``/proc/meminfo``'s figures, in bytes."""
    figures = {}
    with open("/proc/meminfo", "rb") as fh:
        for line in fh:
            name, _, value = line.partition(b":")
            words = value.split()
            if words:
                scale = 1024 if words[1:] == [b"kB"] else 1
                figures[name.decode("ascii", "replace")] = int(words[0]) * scale
    if "MemAvailable" not in figures:  # kernels before 3.14: an estimate
        figures["MemAvailable"] = sum(
            figures.get(name, 0) for name in ("MemFree", "Buffers", "Cached")
        )
    return figures


def _disk_free(path: str) -> float:
    """Bytes an unprivileged user may still write where ``path`` is."""
    fs = os.statvfs(path)
    return float(fs.f_bavail * fs.f_frsize)


def _swap_free() -> float:
    # As dispy's nodes: a node without swap reports 100 (its swap is not in use),
    # not 0, which allocate() checks written for dispy read as swap used up.
    figures = _meminfo()
    total = figures.get("SwapTotal", 0)
    if total <= 0:
        return 100.0
    used = total - figures.get("SwapFree", 0)
    return round(100.0 - 100.0 * used / total, 1)


def _psutil_avail_info(path: str) -> list[float | None]:
    import psutil  # not on Linux: see the module's docstring

    def swap_free() -> float:
        return 100.0 - psutil.swap_memory().percent  # 0% of no swap is in use

    return [
        _read(lambda: max(0.0, 100.0 - psutil.cpu_percent(interval=None))),
        _read(lambda: float(psutil.virtual_memory().available)),
        _read(lambda: float(psutil.disk_usage(path).free)),
        _read(swap_free),
    ]


_CPU = _CpuMeter()
