"""`Run`: a set of jobs submitted together, followed live through cluster callbacks.

A run counts its jobs as the cluster's ``cluster_status`` events arrive (running,
finished, failed, cancelled), so progress, output and results are pushed, never polled.
It works in plain Python as well as in notebooks (``%%dispy`` creates one per cell):

>>> run = Run.map(compute, range(100), nodes=local)  # doctest: +SKIP
>>> run.results[:3], run.df.duration.mean()  # doctest: +SKIP

While someone waits (``run.wait()``, a blocking ``%%dispy``), the waiting thread draws
the progress bar and prints each job's remote stdout, stderr and traceback as the job
ends, so they appear in the cell (or terminal) that waits. A `KeyboardInterrupt` in the
wait (the notebook's Stop button, Ctrl-C) cancels the run's queued and running jobs on
the nodes before it propagates. In "live" mode (``%%dispy --nowait`` in a kernel) the
callback thread drives a widget bar and an output widget instead.

To follow jobs of a cluster you create yourself, give it the run's callbacks::

    run = Run()
    cluster = JobCluster(compute, nodes=local, **run.callbacks())
    run.attach(cluster)
    for x in inputs:
        run.submit(x)
    run.wait()
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from dispynb.job import FINAL_STATUSES, DispyJob, JobStatus
from dispynb.jupyter import display as templates
from dispynb.jupyter import shipping
from dispynb.jupyter.errors import RunInterrupted
from dispynb.jupyter.progress import (
    NullProgressBar,
    ProgressBar,
    ProgressCounts,
    make_progress,
)
from dispynb.jupyter.tracebacks import SourceMap
from dispynb.protocol import serialize

if TYPE_CHECKING:
    import pandas as pd

    from dispynb.backends.base import Engine
    from dispynb.cluster import ClusterFactory, JobCluster
    from dispynb.node import DispyNode

__all__ = ["Run"]

logger = logging.getLogger(__name__)

#: Seconds an interrupted run waits for the nodes to confirm its cancellations.
CANCEL_WAIT = 10.0

#: Seconds between two wake-ups of a waiting thread when nothing happens (only so
#: that a pending throttled redraw is not left behind).
_TICK = 0.25

_FAILED = frozenset({JobStatus.Terminated, JobStatus.Abandoned})

ClusterStatusCallback = Callable[[int, "DispyNode | None", "DispyJob | None"], Any]
Writer = Callable[[str, str], Any]  # (stream name "stdout" / "stderr", text)


class Run:
    """Jobs submitted together, with live counts, output routing and a DataFrame.

    Parameters
    ----------
    cluster:
        The cluster to submit to; it must have been created with this run's
        `callbacks`. May be given later with `attach`.
    name:
        Shown in progress bars and reprs.
    owns_cluster:
        Close ``cluster`` when every job has ended (`Run.map` sets it).
    job_status, cluster_status:
        Your own callbacks, called after the run's (on the cluster's callback thread).

    Attributes
    ----------
    jobs:
        The `DispyJob` objects, in submission order.
    inputs:
        What each job was submitted with, as ``(args, kwargs)``.
    sources:
        Where the shipped code comes from (`SourceMap`), to show remote tracebacks
        with the cell's lines; `map` fills it.
    """

    def __init__(
        self,
        cluster: JobCluster | None = None,
        *,
        name: str = "run",
        owns_cluster: bool = False,
        job_status: Callable[[DispyJob], Any] | None = None,
        cluster_status: ClusterStatusCallback | None = None,
    ) -> None:
        self.name = name
        self.cluster = cluster
        self.jobs: list[DispyJob] = []
        self.inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.owns_cluster = owns_cluster
        self._user_job_status = job_status
        self._user_cluster_status = cluster_status
        self._listeners: list[ClusterStatusCallback] = []
        self._lock = threading.Lock()
        self._index: dict[Any, int] = {}
        self._running: set[Any] = set()
        self._ended: dict[Any, JobStatus] = {}
        self._early_running: set[Any] = set()
        self._early_final: dict[Any, JobStatus] = {}
        self._tally = {"finished": 0, "failed": 0, "cancelled": 0}
        # Jobs this run cancelled: running ones end Terminated, and count as cancelled
        # (not failed) since they were stopped on purpose.
        self._cancelled: set[Any] = set()
        self._provisional: dict[Any, Any] = {}  # job id -> latest provisional result
        self._provisional_count = 0
        self._latest: tuple[Any, Any] | None = None  # (job id, provisional result)
        self.sources = SourceMap()
        self._start: float | None = None
        self._stop: float | None = None
        self._outputs: collections.deque[DispyJob] = collections.deque()
        self._changed = threading.Event()
        self._failure_kinds: dict[str, list[DispyJob]] = {}
        self.bar: ProgressBar = NullProgressBar(name)
        self._live = False
        self._log: Writer | None = None
        self._waiting = False
        self._interrupted = False
        self._close_lock = threading.Lock()
        self._closed = False
        #: Why the run could not start (e.g. no node answered); None if it started.
        self.error: str | None = None

    # -- construction ----------------------------------------------------------------

    @classmethod
    def map(
        cls,
        computation: Callable[..., Any] | str,
        inputs: Iterable[Any],
        *,
        nodes: Any = None,
        engine: Engine | None = None,
        cluster_factory: ClusterFactory | None = None,
        unpack: bool = False,
        wait: bool = True,
        progress: str | ProgressBar = "auto",
        name: str | None = None,
        job_status: Callable[[DispyJob], Any] | None = None,
        cluster_status: ClusterStatusCallback | None = None,
        listeners: Iterable[ClusterStatusCallback] = (),
        **options: Any,
    ) -> Run:
        """Run ``computation`` once per item of ``inputs`` on a new cluster.

        Parameters
        ----------
        computation:
            The function to run (travels by value: cells, closures and helpers work),
            or the path of a program to run with each item's arguments (its exit
            code is the result, its output bytes in ``stdout`` and ``stderr``).
        inputs:
            One job per item; each item is the only argument, unless ``unpack``.
        nodes:
            Where to run, as for `JobCluster` (a `LocalCluster`, node specs...).
        engine:
            What runs the jobs, as for `JobCluster` (None: dispynb's node servers;
            a Dask or Ray engine...).
        cluster_factory:
            Makes the run's cluster (`dispynb.cluster.ClusterFactory`); default
            `dispynb.cluster.new_cluster`.
        unpack:
            Items are argument tuples (or lists) for ``computation(*item)``, and
            dicts for ``computation(**item)``.
        wait:
            Block until every job has ended, showing progress and remote output.
        progress:
            ``"auto"``, ``"widget"``, ``"html"``, ``"text"``, ``"none"`` or a
            `ProgressBar`.
        name:
            The run's name; default: the computation's name.
        job_status, cluster_status:
            Your own callbacks, chained after the run's.
        listeners:
            More ``cluster_status``-style callables (e.g. ``NodePanel.cluster_status``).
        **options:
            Passed to `JobCluster` (``setup``, ``depends``, ``secret``, ``cafile``,
            ``pulse_interval``, ...).

        Warns
        -----
        LargeCaptureWarning
            Once per captured object, if ``computation`` (or ``setup``) captures one
            that takes over a megabyte pickled (see `dispynb.jupyter.shipping`).

        Raises
        ------
        KeyboardInterrupt
            When interrupted while waiting, after cancelling the unfinished jobs.
        """
        from dispynb.cluster import new_cluster

        if isinstance(computation, str):
            label = name or os.path.basename(computation.rstrip("/")) or "run"
        else:
            label = name or str(getattr(computation, "__name__", "run"))
        run = cls(
            name=label,
            owns_cluster=True,
            job_status=job_status,
            cluster_status=cluster_status,
        )
        run._listeners.extend(listeners)
        setup = options.get("setup")
        # As JobCluster will: code from a script's own modules travels by value.
        serialize.ship_by_value(computation, setup)
        shipping.warn_large_captures(computation, "computation", stacklevel=2)
        if callable(setup):
            shipping.warn_large_captures(setup, "setup function", stacklevel=2)
        run.sources = SourceMap.of(
            computation,
            setup,
            *(d for d in options.get("depends") or () if callable(d)),
        )
        run.bar = (
            progress
            if isinstance(progress, ProgressBar)
            else make_progress(progress, title=label)
        )
        # A run belongs to its kernel: when the kernel dies its jobs should free the
        # nodes, not wait an hour for a recover_jobs() that never comes.
        options.setdefault("recover_file", False)
        run.attach(
            (cluster_factory or new_cluster)(
                computation,
                nodes=nodes,
                engine=engine,
                job_status=run._on_job_status,
                cluster_status=run._on_cluster_status,
                **options,
            )
        )
        try:
            run.submit_all(inputs, unpack=unpack)
        except BaseException:
            run.close(terminate=True)
            raise
        if wait:
            run.wait()
        return run

    @classmethod
    def failed(cls, name: str, error: str) -> Run:
        """A run that could not start, with no jobs: ``error`` says why."""
        run = cls(name=name)
        run.error = error
        run._closed = True
        return run

    def callbacks(self) -> dict[str, Callable[..., Any]]:
        """``job_status`` and ``cluster_status`` keyword arguments for `JobCluster`."""
        return {
            "job_status": self._on_job_status,
            "cluster_status": self._on_cluster_status,
        }

    def attach(self, cluster: JobCluster) -> None:
        """Submit to ``cluster``, which was created with this run's `callbacks`."""
        self.cluster = cluster

    def add_listener(self, listener: ClusterStatusCallback) -> None:
        """Also pass every ``cluster_status`` event to ``listener``."""
        self._listeners.append(listener)

    # -- submitting ------------------------------------------------------------------

    def submit(self, *args: Any, **kwargs: Any) -> DispyJob:
        """Submit one job with these arguments to the run's cluster."""
        if self.cluster is None:
            raise RuntimeError("this run has no cluster: call attach(cluster) first")
        cluster = self.cluster
        return self._track(lambda: cluster.submit(*args, **kwargs), args, kwargs)

    def _track(
        self,
        submit: Callable[[], DispyJob],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> DispyJob:
        """Submit with ``submit()`` and follow the job it returns."""
        with self._lock:
            if self._start is None:
                self._start = time.monotonic()
        job = submit()
        with self._lock:
            key = job.id
            self._index[key] = len(self.jobs)
            self.jobs.append(job)
            self.inputs.append((args, kwargs))
            self._stop = None
            if key in self._early_running:
                self._early_running.discard(key)
                self._running.add(key)
            early = self._early_final.pop(key, None)
            if early is not None:
                self._end_job(key, early)
        self._notify()
        return job

    def submit_node(self, node: Any, *args: Any, **kwargs: Any) -> DispyJob:
        """Submit one job to run on ``node`` only (a `DispyNode`, ``"host:port"``,
        address or name; see `JobCluster.submit_node`).

        A node is known once it is set up (its ``Initialized`` event); `JobCluster`
        returns as soon as the first node is, so wait for the others before pinning
        jobs to them.

        Raises
        ------
        ValueError
            If ``node`` is not a node of the run's cluster (naming the known ones).
        """
        if self.cluster is None:
            raise RuntimeError("this run has no cluster: call attach(cluster) first")
        cluster = self.cluster
        return self._track(
            lambda: _require_job(
                cluster, node, cluster.submit_node(node, *args, **kwargs)
            ),
            args,
            kwargs,
        )

    def submit_all(self, inputs: Iterable[Any], unpack: bool = False) -> list[DispyJob]:
        """Submit one job per item of ``inputs`` (see `map` for ``unpack``)."""
        jobs = []
        for item in inputs:
            if unpack and isinstance(item, dict):
                jobs.append(self.submit(**item))
            elif unpack and isinstance(item, tuple | list):
                jobs.append(self.submit(*item))
            else:
                jobs.append(self.submit(item))
        return jobs

    # -- state -----------------------------------------------------------------------

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

        Its ``provisional`` column holds each job's latest provisional result.
        """
        from dispynb.jupyter.frames import jobs_frame

        with self._lock:
            jobs = list(self.jobs)
            latest = [self._provisional.get(job.id, _NONE) for job in jobs]
        return jobs_frame(
            jobs,
            expand=expand,
            provisional=[None if v is _NONE else v for v in latest],
        )

    def traceback(self, job: DispyJob) -> str:
        """``job``'s remote traceback, its frames pointing at the cells (or files)
        the shipped code comes from when that is unambiguous (see
        `dispynb.jupyter.tracebacks`); ``""`` if it has none."""
        return self.sources.rerender(job.exception)

    # -- events (on the cluster's callback thread) -----------------------------------

    def _on_job_status(self, job: DispyJob) -> None:
        if self._user_job_status is not None:
            self._user_job_status(job)

    def _on_cluster_status(
        self, status: int, node: DispyNode | None, job: DispyJob | None
    ) -> None:
        try:
            if job is not None:
                self._job_event(status, job)
            for listener in list(self._listeners):
                listener(status, node, job)
        finally:
            if self._user_cluster_status is not None:
                self._user_cluster_status(status, node, job)

    def _job_event(self, status: int, job: DispyJob) -> None:
        key = job.id
        with self._lock:
            known = key in self._index
            if status == JobStatus.Running:
                if not known:
                    self._early_running.add(key)
                elif key not in self._ended:
                    self._running.add(key)
            elif status in FINAL_STATUSES:
                if not known:
                    self._early_final[key] = JobStatus(status)
                else:
                    self._end_job(key, JobStatus(status))
            elif status == JobStatus.ProvisionalResult:
                if key in self._ended:
                    return
                self._provisional[key] = job.result
                self._provisional_count += 1
                self._latest = (key, job.result)
                if known:
                    self._running.add(key)
                else:
                    self._early_running.add(key)
            else:
                return
        self._notify()

    def _end_job(self, key: Any, status: JobStatus) -> None:
        """Count a job's final status; called with the lock held."""
        if key in self._ended:
            return
        self._ended[key] = status
        self._running.discard(key)
        stopped = status is JobStatus.Terminated and key in self._cancelled
        if status is JobStatus.Finished:
            self._tally["finished"] += 1
        elif status is JobStatus.Cancelled or stopped:
            self._tally["cancelled"] += 1
        else:
            self._tally["failed"] += 1
        job = self.jobs[self._index[key]]
        if job.stdout or job.stderr or (status in _FAILED and not stopped):
            self._outputs.append(job)
        if len(self._ended) >= len(self.jobs):
            self._stop = time.monotonic()

    def _notify(self) -> None:
        self._changed.set()
        if not self._live or self._waiting:
            return
        # Live mode, nobody waiting: this (callback) thread draws.
        self._pump(self._log_writer())
        if self.done():
            self.bar.finish(self.counts())
            if self.owns_cluster:
                threading.Thread(
                    target=self.close, name="dispynb-run-close", daemon=True
                ).start()

    # -- live mode (notebook, --nowait) ------------------------------------------------

    def live(self, bar: ProgressBar, log: Writer | None = None) -> None:
        """Let the callback thread draw ``bar`` and write output to ``log`` as events
        arrive, for runs nobody waits for. ``log(stream, text)`` gets ``"stdout"`` or
        ``"stderr"`` and the text."""
        self.bar = bar
        self._log = log
        self._live = True
        self._notify()

    def _log_writer(self) -> Writer | None:
        return self._log

    # -- waiting ---------------------------------------------------------------------

    def wait(self, timeout: float | None = None, *, echo: bool = True) -> bool:
        """Block until every job has ended, drawing progress and printing output.

        Each job's remote stdout and stderr are printed (to ``sys.stdout`` and
        ``sys.stderr``, or to the run's output widget in `live` mode) as the job
        ends, and the traceback of the first failure of each kind. A run that owns
        its cluster closes it at the end.

        Parameters
        ----------
        timeout:
            Seconds to wait at most; ``None`` waits until done.
        echo:
            Print remote output and tracebacks (they stay in `df` either way).

        Returns
        -------
        bool
            True if every job has ended, False if ``timeout`` passed first.

        Raises
        ------
        KeyboardInterrupt
            After cancelling the run's unfinished jobs on the nodes (see `cancel`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # Output goes where the run sends it: its output widget when live, else here.
        writer = (self._log or _print_writer) if echo else None
        if not self._live:
            self.bar.show()
        self._waiting = True
        try:
            while True:
                self._changed.clear()
                finished = self.done()
                self._pump(writer)
                if finished:
                    break
                tick = _TICK
                if deadline is not None:
                    tick = min(tick, deadline - time.monotonic())
                    if tick <= 0:
                        return False
                self._changed.wait(tick)
        except KeyboardInterrupt:
            self._waiting = False
            summary = self.stop("Interrupted", echo=echo, quiet=True)
            raise RunInterrupted(summary) from None
        finally:
            self._waiting = False
        self.bar.finish(self.counts())
        if writer is not None:
            self._summary(writer)
        if self.owns_cluster:
            self.close()
        return True

    __call__ = wait

    def _pump(self, writer: Writer | None) -> None:
        """Draw the bar and write the output of jobs that ended since the last call."""
        self.bar.update(self.counts())
        while True:
            try:
                job = self._outputs.popleft()
            except IndexError:
                break
            if writer is not None:
                self.bar.before_output()
                self._write_job(job, writer)

    def _write_job(self, job: DispyJob, writer: Writer) -> None:
        label = f"[job {job.id}] "
        for stream in ("stdout", "stderr"):
            text = getattr(job, stream)
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            if text:
                writer(stream, _prefix_lines(text, label))
        if job.status in _FAILED and job.id not in self._cancelled:
            kind = _exception_kind(job.exception)
            seen = self._failure_kinds.setdefault(kind, [])
            seen.append(job)
            if len(seen) == 1:
                where = f" on {job.ip_addr}" if job.ip_addr else ""
                index = self._index.get(job.id)
                writer(
                    "stderr",
                    f"job {job.id} (input {index}){where} failed:\n"
                    f"{self.traceback(job).rstrip()}\n",
                )

    def _summary(self, writer: Writer) -> None:
        for kind, jobs in self._failure_kinds.items():
            if len(jobs) > 1:
                writer(
                    "stderr",
                    f"{kind}: {len(jobs)} jobs (first: job {jobs[0].id}); "
                    f"see {self.name}.failures or .df.exception\n",
                )

    # -- cancelling and closing ------------------------------------------------------

    def cancel(self) -> int:
        """Cancel every unfinished job on the nodes; return how many were cancelled.

        Queued jobs end ``Cancelled``, running ones ``Terminated`` (their worker
        process is killed and replaced).
        """
        cluster = self.cluster
        if cluster is None:
            return 0
        count = 0
        for job in list(self.jobs):
            if job.done():
                continue
            with self._lock:
                self._cancelled.add(job.id)
            if cluster.cancel(job) == 0:
                count += 1
        return count

    def stop(
        self, reason: str = "Stopped", echo: bool = True, quiet: bool = False
    ) -> str:
        """Cancel the unfinished jobs, wait (at most `CANCEL_WAIT` seconds) for the
        nodes to confirm, close the cluster if owned, and return (and print, unless
        ``quiet``) a one-line account: how many running jobs were terminated, how
        many queued ones cancelled.

        What an interrupted `wait` does before raising `RunInterrupted` (a
        `KeyboardInterrupt`) with that line; a second interrupt stops waiting for the
        confirmations. Cancelled jobs are not failures: they count as cancelled.
        """
        self._interrupted = True
        writer = _print_writer if echo else None
        mine = [job for job in list(self.jobs) if not job.done()]
        self.cancel()
        deadline = time.monotonic() + CANCEL_WAIT
        try:
            while time.monotonic() < deadline:
                self._changed.clear()
                if self.done():
                    break
                self._changed.wait(_TICK)
            self._pump(writer)
            self.bar.finish(self.counts())
            if self.owns_cluster:
                self.close(terminate=True)
        except KeyboardInterrupt:
            if self.owns_cluster:
                self.close(terminate=True)
        summary = self._stop_summary(reason, mine)
        if not quiet:
            self.bar.before_output()
            _print_writer("stderr", summary + "\n")
        return summary

    def _stop_summary(self, reason: str, stopped: list[DispyJob]) -> str:
        ends = collections.Counter(job.status for job in stopped)
        after = self.counts()
        parts = [
            f"{ends[JobStatus.Terminated]} running terminated",
            f"{ends[JobStatus.Cancelled]} queued cancelled",
        ]
        finished = ends[JobStatus.Finished]
        if finished:
            parts.append(f"{finished} finished meanwhile")
        unconfirmed = sum(not job.done() for job in stopped)
        if unconfirmed:
            parts.append(f"{unconfirmed} not confirmed by the nodes")
        return (
            f"{reason}: run {self.name!r} stopped, {', '.join(parts)} "
            f"({after.finished} of {after.total} jobs done)"
        )

    def close(self, terminate: bool = False) -> None:
        """Close the run's cluster if the run owns it; ``terminate`` cancels the
        unfinished jobs first (otherwise this waits for them). Idempotent."""
        with self._close_lock:
            if self._closed or self.cluster is None or not self.owns_cluster:
                return
            try:
                self.cluster.close(terminate=terminate)
            finally:
                self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    # -- display ---------------------------------------------------------------------

    def _repr_html_(self) -> str:
        return templates.run_html(self)

    def __repr__(self) -> str:
        if self.error is not None:
            return f"<Run {self.name!r} not started: {self.error.splitlines()[0]}>"
        return f"<Run {self.name!r} {templates.format_counts(self.counts())}>"


_NONE = object()


def _require_job(cluster: Any, node: Any, job: DispyJob | None) -> DispyJob:
    if job is not None:
        return job
    known = ", ".join(
        f"{n.name} ({n.ip_addr}:{n.port})" if n.name else f"{n.ip_addr}:{n.port}"
        for n in cluster.status().nodes
    )
    raise ValueError(
        f"{node!r} is not a node of this cluster; its nodes: {known or 'none'}"
    )


def _print_writer(stream: str, text: str) -> None:
    target = sys.stdout if stream == "stdout" else sys.stderr
    target.write(text)
    target.flush()


def _prefix_lines(text: str, label: str) -> str:
    """``text`` with ``label`` before each of its lines, ending with a newline."""
    lines = text.splitlines()
    return "".join(f"{label}{line}\n" for line in lines)


def _exception_kind(exception: str | None) -> str:
    """``'ValueError'`` from a traceback's last line; the whole line if no colon."""
    if not exception:
        return "failure"
    lines = [line for line in exception.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else exception
    return last.split(":", 1)[0].strip() or "failure"
