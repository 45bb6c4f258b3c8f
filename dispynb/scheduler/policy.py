"""Pure scheduling decisions: how many jobs a node may hold, and which node gets a job.

Contents:

- `window`: the number of jobs kept in flight on a node (its pipeline depth);
- `update_mean`: the running mean of job durations that `window` is fed with;
- `NodeLoad`, `load_key`, `pick_node`, `assign`: load balancing across nodes.

Nothing here keeps state; `dispynb.scheduler.state.SchedulerState` owns the numbers
and asks these functions what to do with them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass

from dispynb.defaults import MAX_JOBS_PER_CPU, MIN_JOBS_PER_CPU

__all__ = [
    "DURATION_WEIGHT",
    "PIPELINE_SECONDS",
    "NodeLoad",
    "assign",
    "load_key",
    "pick_node",
    "update_mean",
    "window",
]

#: Seconds of work to keep queued behind the running job on each CPU of a node.
#: When a job ends, its result travels to the client and the next job travels back:
#: a network round trip plus client work, typically well under a millisecond on a LAN.
#: A CPU that must wait for that round trip idles, so each CPU keeps enough jobs queued
#: to cover it a few times over. Long jobs hide the latency with one queued job; short
#: jobs need a deep pipeline.
PIPELINE_SECONDS = 0.005

#: Weight of the newest duration in the exponential moving average of job durations:
#: recent jobs count most, but one outlier moves the mean by a fifth only.
DURATION_WEIGHT = 0.2

#: A node is refilled once 1/REFILL_FRACTION of its window is free (see `wants_jobs`).
REFILL_FRACTION = 4


def window(cpus: int, mean_duration: float | None) -> int:
    """Return how many jobs may be in flight on a node at once.

    The window is ``cpus * depth``. With nothing known about job durations, the depth
    is `MIN_JOBS_PER_CPU` (one job running and one waiting per CPU). As jobs get
    shorter it grows toward `MAX_JOBS_PER_CPU`, so that about `PIPELINE_SECONDS` of
    work waits behind each running job:
    ``depth = clamp(ceil(PIPELINE_SECONDS / mean_duration) + 1, MIN, MAX)``.
    The cap bounds the work stuck on a node that dies and keeps nodes fairly loaded.

    Parameters
    ----------
    cpus
        CPUs the node offers to this computation; 0 or less means no jobs.
    mean_duration
        Mean run time of recent jobs on the node in seconds, or None if unknown.

    Returns
    -------
    int
        The maximum number of jobs sent to the node and not yet finished.

    Examples
    --------
    >>> window(4, None)
    8
    >>> window(1, 0.001)
    6
    """
    if cpus <= 0:
        return 0
    if mean_duration is None or not mean_duration >= 0.0:  # unknown, NaN
        depth = MIN_JOBS_PER_CPU
    elif mean_duration == 0.0:
        depth = MAX_JOBS_PER_CPU
    else:
        ratio = PIPELINE_SECONDS / mean_duration
        # Compare before ceil(): a tiny duration makes the ratio infinite.
        depth = MAX_JOBS_PER_CPU if ratio >= MAX_JOBS_PER_CPU else math.ceil(ratio) + 1
        depth = max(MIN_JOBS_PER_CPU, min(MAX_JOBS_PER_CPU, depth))
    return cpus * depth


def wants_jobs(cpus: int, running: int, window: int) -> bool:
    """Whether a node should be sent more jobs now.

    Refilling a node one job at a time, as each result comes back, would cost one
    message per job. So a node is topped up only once a quarter of its window is free,
    or as soon as it has no more jobs than CPUs (it would otherwise run dry).

    Examples
    --------
    >>> wants_jobs(2, 60, 64), wants_jobs(2, 48, 64), wants_jobs(2, 2, 4)
    (False, True, True)
    """
    free = window - running
    if free <= 0:
        return False
    return running <= cpus or free >= max(1, window // REFILL_FRACTION)


def update_mean(mean: float | None, duration: float) -> float | None:
    """Fold one job duration into an exponential moving average.

    Parameters
    ----------
    mean
        The current mean in seconds, or None before the first sample.
    duration
        The new sample in seconds. Negative, NaN and infinite samples (a bad clock or
        a bad peer) are ignored.

    Returns
    -------
    float or None
        The new mean (the sample itself for the first one).

    Examples
    --------
    >>> update_mean(None, 2.0)
    2.0
    >>> update_mean(2.0, 1.0)
    1.8
    """
    if not (math.isfinite(duration) and duration >= 0.0):
        return mean
    if mean is None:
        return duration
    return mean + DURATION_WEIGHT * (duration - mean)


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """A snapshot of one node, as load balancing sees it.

    Attributes
    ----------
    node
        The node id.
    cpus
        CPUs the node offers.
    running
        Jobs sent to the node and not yet finished.
    window
        Maximum value of ``running`` (see `window`).
    order
        Join order: lower joined earlier; unique among nodes.
    """

    node: str
    cpus: int
    running: int
    window: int
    order: int

    @property
    def has_room(self) -> bool:
        """Whether the node may take one more job."""
        return self.running < self.window


def load_key(load: NodeLoad) -> tuple[float, int]:
    """Return the sort key of load balancing: lower is preferred.

    Running jobs per CPU first, then join order. Ratios of small ints compare exactly
    as floats (division is correctly rounded), so equal loads tie.
    """
    ratio = load.running / load.cpus if load.cpus > 0 else math.inf
    return (ratio, load.order)


def pick_node(loads: Iterable[NodeLoad]) -> str | None:
    """Return the node that should get the next unpinned job, or None if all are full.

    Among nodes with room, the one with the fewest running jobs per CPU wins; on a
    tie, the one that joined first.

    Examples
    --------
    >>> pick_node([NodeLoad("a", 1, 1, 2, 0), NodeLoad("b", 4, 2, 8, 1)])
    'b'
    """
    best = min((load for load in loads if load.has_room), key=load_key, default=None)
    return None if best is None else best.node


def assign(loads: Iterable[NodeLoad], count: int) -> list[str]:
    """Choose nodes for up to ``count`` unpinned jobs, in dispatch order.

    The result is what calling `pick_node` ``count`` times would give, adding each
    job to the chosen node's ``running`` in between, but costs ``O(log n)`` per job
    instead of ``O(n)``. It is shorter than ``count`` when the nodes fill up.

    Examples
    --------
    >>> assign([NodeLoad("a", 1, 0, 2, 0), NodeLoad("b", 2, 0, 4, 1)], 4)
    ['a', 'b', 'b', 'a']
    """
    # (key, running, load): keys are unique (order is), so the rest is never
    # compared; ``running`` counts up here instead of a new NodeLoad per job.
    heap = [(load_key(load), load.running, load) for load in loads if load.has_room]
    heapq.heapify(heap)
    chosen: list[str] = []
    while heap and len(chosen) < count:
        _, running, load = heap[0]
        chosen.append(load.node)
        running += 1
        if running < load.window:
            ratio = running / load.cpus if load.cpus > 0 else math.inf
            heapq.heapreplace(heap, ((ratio, load.order), running, load))
        else:
            heapq.heappop(heap)
    return chosen
