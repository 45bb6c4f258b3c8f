"""Adaptive scaling for launchers: grow the nodes while jobs wait, shrink idle ones.

`NodeLauncher.adapt` starts an `Adaptive` controller: a thread that looks, every
``interval`` seconds, at the clusters using the launcher's nodes (their public
`JobCluster.workload`: jobs waiting, and each node's jobs) and decides with `plan`:

- **up**: enough nodes for the jobs there are, at the CPUs a node has (learned from
  the nodes' registrations, or ``cpus_per_node``): ``ceil(jobs / cpus)`` nodes, within
  ``[minimum, maximum]``. Nodes still starting count, so a burst launches once.
- **down**: a node that ran nothing for ``idle_timeout`` seconds goes when the jobs
  need fewer nodes, never below ``minimum``, and not within ``cooldown`` seconds of
  the last scaling (with ``idle_timeout``, what keeps the count from flapping). Above
  ``maximum`` (``adapt`` or `NodeLauncher.scale` lowered it), the least busy nodes go
  at once.

A node goes by being **drained**: every cluster stops sending it jobs
(`JobCluster.close_node`: its jobs that have not started go back to the queue, its
running jobs finish), and only once no cluster has it any more does the launcher stop
it. No running job is lost to a scale-down.

Why a thread and not a task on the I/O loop: the cluster's API is synchronous and
runs its work on that loop; the controller calls it like any user thread would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dispynb._interruptible import start_thread
from dispynb.errors import ConfigurationError, DispynbError
from dispynb.wording import counted

if TYPE_CHECKING:
    from dispynb.deploy.scaling import _Scaling
    from dispynb.status import Workload

logger = logging.getLogger(__name__)

#: Longest pause between launches while launched nodes keep failing (s).
MAX_BACKOFF = 60.0


class ScalableCluster(Protocol):
    """What adaptive scaling needs of a cluster (`JobCluster` has it)."""

    def workload(self) -> Workload:
        """Jobs waiting for a node and each node's load."""
        ...

    def close_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Stop sending ``node`` jobs; it leaves once its running jobs finished."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class AdaptOptions:
    """The bounds and timings of adaptive scaling (see `NodeLauncher.adapt`)."""

    minimum: int = 0
    maximum: int = 1
    idle_timeout: float = 60.0
    interval: float = 1.0
    cooldown: float = 10.0
    cpus_per_node: int | None = None

    def __post_init__(self) -> None:
        if self.minimum < 0 or self.maximum < max(self.minimum, 1):
            raise ConfigurationError(
                f"adapt needs 0 <= minimum <= maximum and maximum >= 1, not "
                f"minimum={self.minimum}, maximum={self.maximum}"
            )
        if self.idle_timeout < 0 or self.cooldown < 0 or self.interval <= 0:
            raise ConfigurationError(
                "adapt's idle_timeout and cooldown must be >= 0 and interval > 0 "
                "(seconds)"
            )
        if self.cpus_per_node is not None and self.cpus_per_node < 1:
            raise ConfigurationError("adapt's cpus_per_node must be >= 1")


@dataclasses.dataclass(frozen=True, slots=True)
class NodeView:
    """A launched node, as `plan` sees it."""

    name: str
    registered: bool
    #: Jobs it has now, over every cluster.
    jobs: int
    #: Seconds since it last had a job (or registered); None while busy or starting.
    idle_for: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class ScaleEvent:
    """One scaling step, as `NodeLauncher.events` keeps it."""

    #: Epoch seconds.
    time: float
    #: ``'launch'``, ``'registered'``, ``'drain'``, ``'stopped'``, ``'failed'``,
    #: ``'requeued'`` (SLURM put its batch job back in the queue), ``'suspended'``
    #: or ``'resumed'`` (SLURM stopped its batch job's processes, or let them go on).
    action: str
    #: The node's name.
    node: str
    #: Why (``'3 jobs waiting'``, ``'idle for 61 s'``...).
    detail: str


def target_nodes(
    options: AdaptOptions, jobs: int, cpus: int | None, active: int
) -> int:
    """How many nodes ``jobs`` (waiting or running) need, within the bounds.

    With the CPUs per node unknown (no node registered yet), one node is started to
    learn them: a burst then grows the count at the next look.
    """
    if not jobs:
        want = 0
    elif cpus:
        want = math.ceil(jobs / cpus)
    else:
        want = max(active, 1)
    return min(max(want, options.minimum), options.maximum)


def plan(
    options: AdaptOptions,
    jobs: int,
    cpus: int | None,
    nodes: Sequence[NodeView],
    since_scaled: float,
) -> tuple[int, list[str]]:
    """``(nodes to launch, names of nodes to drain)`` for this look.

    ``jobs``: jobs waiting or running in every cluster; ``nodes``: the launched nodes
    neither draining nor ended; ``since_scaled``: seconds since the last launch or
    drain (the cooldown).
    """
    active = len(nodes)
    target = target_nodes(options, jobs, cpus, active)
    if active < target:
        return target - active, []
    if active > options.maximum:
        # Lowered bounds: the nodes still starting go first, then the least busy.
        order = sorted(nodes, key=lambda n: (n.registered, n.jobs, -(n.idle_for or 0)))
        return 0, [n.name for n in order[: active - options.maximum]]
    if active > target and since_scaled >= options.cooldown:
        idle = [
            n
            for n in nodes
            if n.idle_for is not None and n.idle_for >= options.idle_timeout
        ]
        idle.sort(key=lambda n: -(n.idle_for or 0))
        return 0, [n.name for n in idle[: active - target]]
    return 0, []


class Adaptive:
    """The controller `NodeLauncher.adapt` starts (a daemon thread); `stop` ends it.

    Attributes
    ----------
    options:
        The bounds and timings in force.
    """

    def __init__(
        self,
        launcher: _Scaling[Any],  # a NodeLauncher: its scaling part is what is used
        options: AdaptOptions,
        *,
        only_drain: bool = False,
    ) -> None:
        self.launcher = launcher
        self.options = options
        # `NodeLauncher.scale`'s drainer: finish drains, then end.
        self._only_drain = only_drain
        self._stop = threading.Event()
        self._last_scaled = -math.inf
        self._failures = 0
        self._next_launch = 0.0
        self._thread = threading.Thread(
            target=self._run, name="dispynb-adapt", daemon=True
        )

    def start(self) -> None:
        """Start looking (called by `NodeLauncher.adapt`)."""
        if not self._only_drain:
            logger.info(
                "adapt: %d to %s, idle timeout %g s",
                self.options.minimum,
                counted(self.options.maximum, "node"),
                self.options.idle_timeout,
            )
        start_thread(self._thread)

    @property
    def running(self) -> bool:
        """Whether the controller still looks."""
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def adapting(self) -> bool:
        """Whether it adapts the nodes (not only finishing `scale`'s drains)."""
        return self.running and not self._only_drain

    def stop(self) -> None:
        """Stop adapting (the nodes stay as they are); idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                logger.exception("adapt: a scaling step failed (retrying)")
            self._stop.wait(self.options.interval)

    def step(self) -> None:
        """One look: finish drains, then launch or drain as `plan` says."""
        launcher = self.launcher
        now = time.monotonic()
        loads = launcher._workloads()
        if launcher._finish_drains(loads) == 0 and self._only_drain:
            self._stop.set()
        if self._only_drain:
            return
        with launcher._scaling:  # one scaling decision at a time per launcher
            self._decide(now, loads)

    def _back_off(self, now: float, failures: int, what: str) -> None:
        """Launch no more for a while: twice as long after each failure in a row."""
        self._failures += failures
        backoff = min(MAX_BACKOFF, self.options.interval * 2**self._failures)
        self._next_launch = now + backoff
        logger.warning(
            "adapt: %s; next launch in %.1f s at the earliest", what, backoff
        )

    def _decide(
        self, now: float, loads: list[tuple[ScalableCluster, Workload]]
    ) -> None:
        launcher = self.launcher
        failed, registered = launcher._reap_launches(now)
        if failed:
            self._back_off(now, failed, f"{failed} launched node(s) failed")
        elif registered:
            self._failures = 0
        views, jobs = launcher._node_views(loads, now)
        cpus = self.options.cpus_per_node or launcher._cpus_per_node()
        launch, drain = plan(self.options, jobs, cpus, views, now - self._last_scaled)
        if launch and now >= self._next_launch and not self._stop.is_set():
            self._last_scaled = now
            unbounded = dataclasses.replace(self.options, minimum=0)
            by_jobs = target_nodes(unbounded, jobs, cpus, len(views))
            why = (
                f"{jobs} job(s) waiting or running"
                if by_jobs > self.options.minimum
                else f"the minimum of {self.options.minimum}"
            )
            try:
                launcher._scale_up(launch, why)
            except DispynbError as exc:  # e.g. ssh -G or sbatch refused
                self._back_off(now, 1, f"launching failed: {exc}")
        if drain:
            self._last_scaled = now
            idle = {v.name: v.idle_for for v in views}
            over = len(views) > self.options.maximum
            for name in drain:
                seconds = idle.get(name)
                why = (
                    f"over the maximum of {self.options.maximum}"
                    if over or seconds is None
                    else f"idle for {seconds:.0f} s"
                )
                launcher._drain([name], why)


__all__ = [
    "AdaptOptions",
    "Adaptive",
    "NodeView",
    "ScalableCluster",
    "ScaleEvent",
    "plan",
    "target_nodes",
]
