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
import operator
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from dispynb._interruptible import Flag, HeldInterrupts
from dispynb.errors import ClusterError, ConfigurationError, SerializationError
from dispynb.job import DispyJob, JobStatus
from dispynb.jupyter import display as templates
from dispynb.jupyter import shipping
from dispynb.jupyter.errors import RunInterrupted
from dispynb.jupyter.lostchanges import warn_lost_changes
from dispynb.jupyter.progress import NullProgressBar, ProgressBar, make_progress
from dispynb.jupyter.runevents import _RunEvents
from dispynb.jupyter.runstate import ClusterStatusCallback as ClusterStatusCallback
from dispynb.jupyter.runstate import Writer as Writer
from dispynb.jupyter.runstop import CANCEL_WAIT as CANCEL_WAIT
from dispynb.jupyter.tracebacks import SourceMap
from dispynb.protocol import serialize
from dispynb.transport.addressing import format_address

if TYPE_CHECKING:
    from dispynb.backends.base import Engine
    from dispynb.cluster import ClusterFactory, JobCluster
    from dispynb.node import DispyNode

__all__ = ["LAST_RUN", "Run"]

#: The notebook's name that always holds the last run of ``%%dispy`` (like ``_`` for
#: results), and the `Run.map` stopped before it could return its run.
LAST_RUN = "_dispy"

logger = logging.getLogger(__name__)


class Run(_RunEvents):
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
        #: How the person reaches this run (a variable's name), in the messages
        #: that point at it; "" if unknown (``x = Run.map(...)`` is not assigned
        #: yet as its jobs end): they then say "the run's".
        self.ref = ""
        self._follow(cluster)
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
        # The node each job ran on, last (its name and port, which the job's
        # ip_addr does not tell apart among nodes of one address: %dispy local).
        self._ran_on: dict[Any, DispyNode] = {}
        self._provisional: dict[Any, Any] = {}  # job id -> latest provisional result
        self._provisional_count = 0
        self._latest: tuple[Any, Any] | None = None  # (job id, provisional result)
        self.sources = SourceMap()
        self._start: float | None = None
        self._stop: float | None = None
        self._outputs: collections.deque[DispyJob] = collections.deque()
        # Waited on by the kernel's main thread, through the Stop button's
        # interrupts: not an Event (`dispynb._interruptible.Sleepers`).
        self._changed = Flag()
        self._failure_kinds: dict[str, list[DispyJob]] = {}
        self._shown = 0  # characters of job output shown (see runoutput.RUN_SHOWN)
        self._muted = False  # the note that further output is not shown was written
        self._told_reentrant = False  # the --reentrant hint was written
        self.bar: ProgressBar = NullProgressBar(name)
        self._live = False
        self._unattended = False  # closes its cluster when done (see `unattended`)
        self._log: Writer | None = None
        self._waiting = False
        self._interrupted = False
        self._close_lock = threading.Lock()
        self._closed = False
        #: Why the run could not start (e.g. no node answered); None if it started.
        self.error: str | None = None
        #: Why submitting stopped before every input was (Stop, an error of the
        #: inputs or of a submit); None if every input was submitted.
        self.cut_short: str | None = None
        #: How many inputs there were to submit, if they said (`len`); else None.
        self.planned: int | None = None

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
        started: Callable[[Run], Any] | None = None,
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
            If False, the run closes its cluster once its jobs have ended (call
            `wait` to see their output).
        progress:
            ``"auto"``, ``"widget"``, ``"html"``, ``"text"``, ``"none"`` or a
            `ProgressBar`.
        name:
            The run's name; default: the computation's name.
        job_status, cluster_status:
            Your own callbacks, chained after the run's.
        listeners:
            More ``cluster_status``-style callables (e.g. ``NodePanel.cluster_status``).
        started:
            Called with the run once its cluster is up, before the first job is
            submitted: a caller keeps the run (and its jobs) even when submitting
            stops with an error or an interrupt.
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
        ConfigurationError
            ``computation`` is an ``async def`` or generator function: its jobs
            would return coroutines or generators, which cannot be sent back.
        RunInterrupted
            A `KeyboardInterrupt`, when interrupted (after cancelling the unfinished
            jobs, or closing the cluster that was starting); its message says what
            was stopped. Its ``run`` is the stopped run, with what finished (None
            if no job was sent); in a notebook, ``_dispy`` holds it too, unless
            ``started`` was given (the message says so).
        """
        from dispynb.cluster import new_cluster

        if isinstance(computation, str):
            label = name or os.path.basename(computation.rstrip("/")) or "run"
        else:
            label = name or str(getattr(computation, "__name__", "run"))
            problem = shipping.return_problem(computation)
            if problem is not None:  # every job would fail alike: none is sent
                raise ConfigurationError(problem)
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
        warn_lost_changes(computation)  # results.append(x) in a job: never back
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
        try:
            cluster = (cluster_factory or new_cluster)(
                computation,
                nodes=nodes,
                engine=engine,
                **run.callbacks(),
                **options,
            )
        except KeyboardInterrupt:
            # The cluster closed itself on the way out (its setup ended on the
            # nodes with what it started); no job was sent.
            raise RunInterrupted(
                f"Interrupted: run {label!r} stopped before it started (its cluster "
                "was starting); no job was sent and nothing is left running"
            ) from None
        try:
            run.attach(cluster)
            run.planned = _planned(inputs)
            if started is not None:
                started(run)
            run.submit_all(inputs, unpack=unpack)
        except KeyboardInterrupt:
            run._follow(cluster)  # interrupted before attach: still closed below
            summary = run.stop("Interrupted while submitting", echo=False, quiet=True)
            run.cut_short = "Interrupted"
            raise run._stopped_error(summary, kept=started is not None) from None
        except BaseException as exc:
            run._follow(cluster)
            run.cut_short = f"{type(exc).__name__}: {exc}"
            run.close(terminate=True)
            raise
        if wait:
            try:
                run.wait()
            except RunInterrupted as exc:
                raise run._stopped_error(str(exc), kept=started is not None) from None
        else:
            run.unattended()
        return run

    def _stopped_error(self, summary: str, kept: bool) -> RunInterrupted:
        """The `RunInterrupted` that `map` raises with ``summary``, holding this run.

        ``run = Run.map(...)`` stopped never assigns ``run``: unless the caller
        keeps the run (``kept``: its ``started``), a notebook's `LAST_RUN` variable
        holds it, and the message says so, so that what finished is not lost.
        """
        if not kept and _keep_in_notebook(self):
            self.ref = LAST_RUN
            summary += (
                f"; {LAST_RUN} holds the run (what finished: {LAST_RUN}.results, "
                f"{LAST_RUN}.df)"
            )
        return RunInterrupted(summary, run=self)

    @classmethod
    def failed(cls, name: str, error: str) -> Run:
        """A run that could not start, with no jobs: ``error`` says why."""
        run = cls(name=name)
        run.error = error
        run._closed = True
        return run

    def callbacks(self) -> dict[str, Callable[..., Any]]:
        """``cluster_status`` (and ``job_status`` if the run was given one) keyword
        arguments for `JobCluster`.

        The run follows its jobs through ``cluster_status`` alone: a ``job_status``
        callback would cost a copy of each job and a call as each ends (200,000 of
        them as a Stop cancels a 200,000-job run), for nothing.
        """
        callbacks: dict[str, Callable[..., Any]] = {
            "cluster_status": self._on_cluster_status
        }
        if self._user_job_status is not None:
            callbacks["job_status"] = self._on_job_status
        return callbacks

    def forwards_events(self) -> bool:
        """Whether the run passes its cluster's jobs on (to its own
        ``cluster_status``, or a listener without a false ``reads_jobs``
        attribute): if not, the cluster skips the ``Created`` events, which the run
        ignores, and need not copy the jobs it cancels together for it (a Stop)."""
        return self._user_cluster_status is not None or any(
            getattr(listener, "reads_jobs", True) for listener in self._listeners
        )

    def attach(self, cluster: JobCluster) -> None:
        """Submit to ``cluster``, which was created with this run's `callbacks`."""
        self._follow(cluster)

    def add_listener(self, listener: ClusterStatusCallback) -> None:
        """Also pass every ``cluster_status`` event to ``listener``."""
        self._listeners.append(listener)

    # -- submitting ------------------------------------------------------------------

    def submit(self, *args: Any, **kwargs: Any) -> DispyJob:
        """Submit one job with these arguments to the run's cluster.

        Raises
        ------
        ClusterError
            The run made its cluster (`map`) and closed it, its jobs ended.
        """
        cluster = self._open_cluster()
        return self._track(lambda: cluster.submit(*args, **kwargs), args, kwargs)

    def _open_cluster(self) -> JobCluster:
        """The cluster to submit to, or why there is none to submit to."""
        if self.cluster is None:
            raise RuntimeError("this run has no cluster: call attach(cluster) first")
        if self.owns_cluster and (
            self._closed or getattr(self.cluster, "_closed", False)
        ):
            # Not the cluster's 'create a new JobCluster': the user made none.
            raise ClusterError(
                f"run {self.name!r} closed the cluster it made (Run.map closes it "
                "once its jobs have ended, with wait=False too, or as the run is "
                "stopped or closed): give the new inputs to another Run.map, or "
                "make a JobCluster and attach it to a Run (run.attach(cluster)) "
                "to submit to it for as long as it is open"
            )
        return self.cluster

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
        # A Stop between the cluster's taking the job and the run's counting it
        # would leave a job the run does not know (not cancelled, not counted):
        # held until the job is counted, then raised.
        with HeldInterrupts():
            job = submit()
            self._record(job, args, kwargs)
        self._notify()
        return job

    def _record(
        self, job: DispyJob, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Count ``job`` (submitted with these arguments) as the run's."""
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
        ClusterError
            The run made its cluster (`map`) and closed it, its jobs ended.
        """
        cluster = self._open_cluster()
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
            try:
                if unpack and isinstance(item, dict):
                    jobs.append(self.submit(**item))
                elif unpack and isinstance(item, tuple | list):
                    jobs.append(self.submit(*item))
                else:
                    jobs.append(self.submit(item))
            except SerializationError as exc:
                # Which of a thousand inputs: 'job argument 1' names none of them.
                # Its row of run.df, as its output's label ('[input 3]'), which
                # counts the jobs the run had already (a second submit_all).
                raise SerializationError(f"input {len(self.jobs)}: {exc}") from exc
        return jobs

    # -- display ---------------------------------------------------------------------

    def _repr_html_(self) -> str:
        return templates.run_html(self)

    def submitted(self) -> str:
        """``'3 of 10 jobs submitted'`` (``'3 jobs submitted'`` if the inputs did
        not say how many they were)."""
        count = len(self.jobs)
        of = f" of {self.planned}" if self.planned is not None else ""
        return f"{count}{of} job{'s' * (count != 1 or bool(of))} submitted"

    def __repr__(self) -> str:
        if self.error is not None:
            return f"<Run {self.name!r} not started: {self.error.splitlines()[0]}>"
        counts = templates.format_counts(self.counts())
        if self.cut_short is not None:
            why = self.cut_short.splitlines()[0] if self.cut_short else "stopped"
            return (
                f"<Run {self.name!r} stopped while submitting, {self.submitted()} "
                f"({why}): {counts}>"
            )
        return f"<Run {self.name!r} {counts}>"


def _keep_in_notebook(run: Run) -> bool:
    """Put ``run`` in the notebook's `LAST_RUN` variable; False outside IPython."""
    ipython = sys.modules.get("IPython")  # not loaded: not in a notebook
    shell = ipython.get_ipython() if ipython is not None else None
    user_ns = getattr(shell, "user_ns", None)
    if not isinstance(user_ns, dict):
        return False
    user_ns[LAST_RUN] = run
    return True


def _planned(inputs: Iterable[Any]) -> int | None:
    """How many items ``inputs`` has, if it says (``len``); None if unknown."""
    try:
        hint = operator.length_hint(inputs, -1)
    except Exception:  # a len() that raises: unknown
        return None
    return hint if hint >= 0 else None


def _require_job(cluster: Any, node: Any, job: DispyJob | None) -> DispyJob:
    if job is not None:
        return job
    addresses = [
        (n.name, format_address(n.ip_addr, n.port)) for n in cluster.status().nodes
    ]
    known = ", ".join(f"{name} ({at})" if name else at for name, at in addresses)
    raise ValueError(
        f"{node!r} is not a node of this cluster; its nodes: {known or 'none'}"
    )
