"""Wait until the machine's CPUs are quiet before a timed repetition starts.

The benchmark machine is shared (other engineers' tests, CI runs) and small (2
CPUs): a burst of someone else's work during a repetition of a few hundred
milliseconds decides its number. W4 cold on a quiet machine (the same code, issue 17,
2026-12-05): dispynb 2,700-3,500 MB/s and Ray 1,070-1,210 in every repetition;
started while other processes kept the CPUs 60-100% busy, dispynb fell to 570-1,900
and Ray to 640-1,090, in no fixed order. So W4 cold starts its clock only after one
`WINDOW` in which the CPUs were at most `BUSY` busy (all processes, the backend's
own idle ones included: Ray's idle about 5% of one CPU, dispynb's less), or after
`MAX_WAIT` seconds if the machine never gets there; the wait and the last window's
load are recorded with the repetition, so a repetition that started busy shows. The
same rule holds for every backend.

Linux only (``/proc/stat``); elsewhere the clock starts at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypedDict

__all__ = ["BUSY", "MAX_WAIT", "WINDOW", "Settled", "cpu_times", "wait_until_quiet"]

#: Seconds of one sample of the CPUs' load.
WINDOW = 0.2
#: Busy share of all CPUs (0-1) a window may have to count as quiet.
BUSY = 0.15
#: Seconds after which the repetition starts anyway.
MAX_WAIT = 10.0


class Settled(TypedDict):
    """What `wait_until_quiet` found: seconds waited, and the busy share of all CPUs
    (0-1) in the last window (``None`` where the load cannot be read)."""

    waited: float
    busy: float | None


def cpu_times() -> tuple[int, int]:
    """All CPUs' time so far and the idle part of it (``/proc/stat``, in ticks)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = fh.readline().split()
    if not fields or fields[0] != "cpu":
        raise OSError("unexpected /proc/stat")
    # user nice system idle iowait irq softirq steal (guest times are in user)
    ticks = [int(value) for value in fields[1:9]]
    return sum(ticks), ticks[3] + ticks[4]


def wait_until_quiet(
    *,
    window: float = WINDOW,
    busy: float = BUSY,
    max_wait: float = MAX_WAIT,
    sample: Callable[[], tuple[int, int]] = cpu_times,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Settled:
    """Return once one ``window`` had at most ``busy`` of the CPUs busy, or after
    ``max_wait`` seconds (see the module docstring)."""
    start = clock()
    try:
        before = sample()
    except OSError:
        return {"waited": 0.0, "busy": None}
    while True:
        sleep(window)
        after = sample()
        total = after[0] - before[0]
        load = 1.0 - (after[1] - before[1]) / total if total > 0 else 0.0
        waited = clock() - start
        if load <= busy or waited >= max_wait:
            return {"waited": round(waited, 3), "busy": round(load, 3)}
        before = after
