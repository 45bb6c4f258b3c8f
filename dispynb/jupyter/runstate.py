"""The state every part of `Run` shares, and what the run knows of its jobs: its
counts, results, provisional results, failures and DataFrame."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dispynb._interruptible import Flag
from dispynb.job import DispyJob, JobStatus
from dispynb.jupyter import display as templates
from dispynb.jupyter.progress import ProgressBar, ProgressCounts
from dispynb.jupyter.tracebacks import SourceMap

if TYPE_CHECKING:
    import pandas as pd

    from dispynb.cluster import JobCluster
    from dispynb.node import DispyNode

#: Seconds between two wake-ups of a waiting thread when nothing happens (only so
#: that a pending throttled redraw is not left behind).
_TICK = 0.25

_FAILED = frozenset({JobStatus.Terminated, JobStatus.Abandoned})

ClusterStatusCallback = Callable[[int, "DispyNode | None", "DispyJob | None"], Any]
Writer = Callable[[str, str], Any]  # (stream name "stdout" / "stderr", text)


class _RunState:
    """A `Run`'s state (its parts: `runoutput`, the jobs' output; `runstop`,
    cancelling and closing; `runevents`, the cluster's events and waiting for them)."""

    # Set by `Run.__init__` (see there).
    name: str
    ref: str
    cluster: JobCluster | None
    jobs: list[DispyJob]
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]
    owns_cluster: bool
    _user_job_status: Callable[[DispyJob], Any] | None
    _user_cluster_status: ClusterStatusCallback | None
    _listeners: list[ClusterStatusCallback]
    _lock: threading.Lock
    _index: dict[Any, int]
    _running: set[Any]
    _ended: dict[Any, JobStatus]
    _early_running: set[Any]
    _early_final: dict[Any, JobStatus]
    _tally: dict[str, int]
    _cancelled: set[Any]
    _ran_on: dict[Any, DispyNode]
    _provisional: dict[Any, Any]
    _provisional_count: int
    _latest: tuple[Any, Any] | None
    sources: SourceMap
    _start: float | None
    _stop: float | None
    _outputs: collections.deque[DispyJob]
    _changed: Flag
    _failure_kinds: dict[str, list[DispyJob]]
    _shown: int
    _muted: bool
    _told_reentrant: bool
    bar: ProgressBar
    _live: bool
    _unattended: bool
    _log: Writer | None
    _waiting: bool
    _interrupted: bool
    _close_lock: threading.Lock
    _closed: bool
    error: str | None
    cut_short: str | None
    planned: int | None

    # -- what the run knows ------------------------------------------------------------

    def counts(self) -> ProgressCounts:
        """A snapshot of the run's progress."""
        with self._lock:
            return self._counts()

    def _counts(self) -> ProgressCounts:
        start = self._start
        end = self._stop if self._stop is not None else time.monotonic()
        return ProgressCounts(
            total=len(self.jobs),
            finished=self._tally["finished"],
            failed=self._tally["failed"],
            cancelled=self._tally["cancelled"],
            running=len(self._running),
            elapsed=0.0 if start is None else end - start,
            provisional=self._provisional_count,
            latest=self._latest_text(),
        )

    def _latest_text(self) -> str:
        """``'job 3: 0.75'``: the latest provisional result, shortened."""
        if self._latest is None:
            return ""
        key, value = self._latest
        index = self._index.get(key)
        who = f"input {index}" if index is not None else f"job {key}"
        return f"{who}: {templates.short_repr(value, 40)}"

    def done(self) -> bool:
        """Whether every job submitted so far has ended (and its events were seen)."""
        with self._lock:
            return len(self._ended) >= len(self.jobs)

    @property
    def results(self) -> list[Any]:
        """Each job's result in submission order (``None`` for jobs without one)."""
        return [job.result for job in self.jobs]

    @property
    def provisional(self) -> dict[int, Any]:
        """The latest provisional result of each job that sent one, by input index
        (the job's position in `jobs`). Final results are in `results`."""
        with self._lock:
            return {
                self._index[key]: value
                for key, value in self._provisional.items()
                if key in self._index
            }

    @property
    def failures(self) -> list[DispyJob]:
        """Jobs that raised, crashed or were abandoned, in submission order (jobs
        terminated because the run was cancelled or stopped are not failures)."""
        return [
            job
            for job in self.jobs
            if job.status in _FAILED and job.id not in self._cancelled
        ]

    @property
    def df(self) -> pd.DataFrame:
        """The jobs as a DataFrame (see `dispynb.jupyter.frames.jobs_frame`)."""
        return self.frame()

    def frame(self, expand: bool = False) -> pd.DataFrame:
        """The jobs as a DataFrame; ``expand`` turns dict results into columns.

        Its ``provisional`` column holds each job's latest provisional result, its
        ``node`` and ``node_name`` columns the node each job ran on (``HOST:PORT``,
        its name), which tell apart nodes of one address (``%dispy local``).
        """
        from dispynb.jupyter.frames import jobs_frame

        with self._lock:
            jobs = list(self.jobs)
            latest = [self._provisional.get(job.id, _NONE) for job in jobs]
            nodes = [self._ran_on.get(job.id) for job in jobs]
        return jobs_frame(
            jobs,
            expand=expand,
            provisional=[None if v is _NONE else v for v in latest],
            nodes=nodes,
        )

    def traceback(self, job: DispyJob) -> str:
        """``job``'s remote traceback, its frames pointing at the cells (or files)
        the shipped code comes from when that is unambiguous (see
        `dispynb.jupyter.tracebacks`); ``""`` if it has none."""
        return self.sources.rerender(job.exception)


_NONE = object()
