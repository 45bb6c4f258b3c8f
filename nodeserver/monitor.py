"""What a node reports about its resources (dispy's DispyNodeAvailInfo), via psutil."""

from __future__ import annotations

from collections.abc import Callable

import psutil


def avail_info(path: str) -> list[float | None]:
    """``[cpu %, memory bytes, disk bytes, swap %]`` available now.

    CPU availability is measured since the previous call (the first call after start
    compares with process start), so calling this periodically costs nothing.
    Each figure that cannot be read now (no descriptor left to open ``/proc``
    with) is None, unknown: a node short of descriptors still answers and pulses,
    and is not taken for a full node (0% CPU, no memory free). A client shows a
    node with an unknown figure as not reported (``DispyNode.avail_info`` None).
    """
    return [
        _read(lambda: max(0.0, 100.0 - psutil.cpu_percent(interval=None))),
        _read(lambda: float(psutil.virtual_memory().available)),
        _read(lambda: float(psutil.disk_usage(path).free)),
        _read(_swap_free),
    ]


def _swap_free() -> float:
    # As dispy's nodes: a node without swap reports 100 (psutil's percent is 0),
    # not 0, which allocate() checks written for dispy read as swap used up.
    return 100.0 - psutil.swap_memory().percent


def _read(figure: Callable[[], float]) -> float | None:
    """``figure()``, or None if it cannot be read now."""
    try:
        return figure()
    except OSError:
        return None
