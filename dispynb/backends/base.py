"""The seam between dispy's façade (`JobCluster`) and the engine that runs its jobs.

`JobCluster` keeps what dispy's users see: options, the job table, ``DispyJob``
objects, callbacks, listeners, the journal, status. An **engine** runs the jobs:
dispynb's own node servers (`dispynb.backends.nodes`, the default), an existing Dask
or Ray cluster. The façade talks to an engine only through the types of this module:

1. ``JobCluster(computation, ..., engine=ENGINE)`` checks the options it was given
   against ``ENGINE.features`` (an option the engine lacks raises
   `NotSupportedError` before anything starts), then calls
   ``ENGINE.open(events, config)``: ``events`` is the façade's `JobEvents` sink,
   ``config`` a `ClusterConfig`. ``open`` returns a `Backend` once jobs can be
   submitted, or raises.
2. The façade calls the `Backend`'s methods (``submit``, ``cancel``, node
   management, ``close``); the backend reports what happens to jobs and nodes by
   calling the `JobEvents` methods, naming jobs by the integer ``key`` the façade gave
   them and nodes by a `NodeInfo` (never an engine's own objects).

Threads
-------
The façade owns a background asyncio loop (``config.runner``, a `LoopRunner`).

* **Every** `JobEvents` method must be called on that loop's thread, one at a time,
  in the order things happened. A backend whose engine calls it back on other
  threads hands each event over with ``config.runner.call_soon(fn, *args)`` (or
  ``loop.call_soon_threadsafe``). The façade's handlers are quick and never block.
  One exception: a thread that holds the loop (``config.runner.enter()`` returned
  True, until ``leave()``) stands in for the loop's thread, which runs nothing
  meanwhile, so events still come one at a time and in order. The nodes backend
  does that while the loop waits for I/O: `Backend.submit` sends a small job on the
  submitting thread (its one event then is ``jobs_sent``, which the façade turns
  into a write to the recovery journal, thread-safe like the ``submitted`` record
  that thread writes anyway: the job is recorded as sent when it is sent).
* `Backend.prepare`, `Backend.submit`, `Backend.cancel` and `Backend.traffic`
  never block and may be called from any thread, the loop's included.
* The other `Backend` methods may block (bounded: a few seconds, ``close`` up to
  about a minute) and are called from user threads, **never** from the loop thread.
  A backend that keeps its state on the loop runs them there with
  ``config.runner.run_sync``. Events handed over with ``call_soon`` before some
  point are delivered once ``config.runner.run_sync`` of a no-op coroutine returns
  (``open`` can use that to deliver its first ``node_ready``, ``close`` its last
  events).

Job life cycle (what the façade expects)
----------------------------------------
Each submitted key ends with exactly one of ``job_done``, ``job_abandoned`` or
``job_cancelled`` (or ``jobs_cancelled``, many at once); after that the backend
forgets the key (a late report for it is ignored by the façade, but should not be
sent). Before that it may get
``jobs_sent`` (journal only), ``job_running`` (at most once per attempt),
``job_provisional`` (any number) and ``job_requeued`` (its node was lost and it
waits to run again elsewhere; ``job_running`` may then follow again).

Features
--------
An engine declares what it provides in ``Engine.features``, a frozenset of the
feature names below (`ALL_FEATURES`). The façade raises `NotSupportedError`, naming
the engine and the feature, when a user asks for one that is missing; the backend's
corresponding methods are then never called (they may raise `NotSupportedError`
too). Everything not listed (submit, cancel, wait, callbacks, ``job_status``,
provisional results sent by jobs, status, close) every engine must provide.
"""

from __future__ import annotations

import enum
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from dispynb.errors import ConfigurationError, NotSupportedError
from dispynb.job import JobStatus
from dispynb.limits import DEFAULT_MAX_PIDS
from dispynb.node import DispyNodeAvailInfo

if TYPE_CHECKING:
    from dispynb._loop import LoopRunner
    from dispynb.depends import Dependencies, FileRef
    from dispynb.node import NodeAllocate
    from dispynb.options import ClusterOptions
    from dispynb.tracebacks import LazySourceMap

# -- features ----------------------------------------------------------------------

#: A program file (``JobCluster('prog.py')``) instead of a Python function.
PROGRAM: Final = "program"
#: ``setup=`` (run once per node before its jobs) and a callable ``cleanup=``.
SETUP: Final = "setup"
#: ``submit_node`` / ``submit_job_id_node``: run a job on a node the user chose.
SUBMIT_NODE: Final = "submit_node"
#: ``allocate_node``, ``deallocate_node``, ``set_node_cpus``, ``close_node``,
#: ``resetup_node``: the user adds, removes and sizes nodes.
NODE_MANAGEMENT: Final = "node_management"
#: ``send_file``: copy a file into the computation's directory on one node.
SEND_FILE: Final = "send_file"
#: ``dispy_job_depends=``: files and objects sent with one job.
JOB_DEPENDS: Final = "job_depends"
#: ``job_timeout``/``mem_limit`` and ``dispy_job_timeout``/``dispy_job_mem_limit``,
#: enforced where the job runs (it ends ``Terminated``).
JOB_LIMITS: Final = "job_limits"
#: ``recover_file=``: nodes keep results for a client that went away, for
#: ``recover_jobs``.
RECOVERY: Final = "recovery"
#: ``node_jobs``: the jobs running on a node now.
NODE_JOBS: Final = "node_jobs"
#: ``nodes=`` names the engine's workers a cluster's jobs run on (``%%dispy --on``).
SELECT_NODES: Final = "select_nodes"
#: ``max_result_size=``: a result over it is not sent, its job ends ``Terminated``
#: with ``ResultTooLarge``.
RESULT_LIMIT: Final = "result_limit"
#: ``max_pids=``: a job's processes and threads are held to it (a pids cgroup per
#: worker, or counting). Without it only the default (dispynb's nodes' safety net)
#: and None are accepted: the engine's own limits apply.
PIDS_LIMIT: Final = "pids_limit"
#: ``result_types=``: results are unpickled on the client by a restricted unpickler,
#: out of the job's reach (the process that sends them back is not the job's).
RESULT_TYPES: Final = "result_types"
#: ``fresh_process=True`` (the Executor's ``max_tasks_per_child``): each job runs
#: in a new process forked after setup.
FRESH_PROCESS: Final = "fresh_process"
#: The bytes sent to and received from each node are counted (``DispyNode.tx`` and
#: ``rx``, `Backend.traffic`); without it ``print_status`` shows "-" for them.
TRAFFIC: Final = "traffic"

#: Every feature name an engine may declare.
ALL_FEATURES: Final[frozenset[str]] = frozenset(
    {
        PROGRAM,
        SETUP,
        SUBMIT_NODE,
        NODE_MANAGEMENT,
        SEND_FILE,
        JOB_DEPENDS,
        JOB_LIMITS,
        RECOVERY,
        NODE_JOBS,
        SELECT_NODES,
        RESULT_LIMIT,
        PIDS_LIMIT,
        RESULT_TYPES,
        TRAFFIC,
        FRESH_PROCESS,
    }
)

# -- the neutral views -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node (a worker of the engine) as the façade sees it.

    The façade turns it into dispy's `DispyNode`. It is immutable: a change of
    availability comes with ``JobEvents.node_status``, a node set up again
    (``resetup_node``) comes back with a new ``node_ready``.
    """

    #: Unique in the cluster and stable while the node is known, also across a
    #: re-setup and a reconnection: the façade passes it back to `Backend` methods.
    #: dispynb's nodes use ``'host:port'``; any string the engine likes will do.
    node_id: str
    #: IP address (dispy's ``DispyNode.ip_addr`` and ``DispyJob.ip_addr``).
    host: str
    #: Port the engine reaches it on; 0 if that means nothing for the engine.
    port: int
    #: Host name it reports ('' if unknown).
    name: str
    #: CPUs (parallel job slots) set up for this cluster: the most ``set_cpus`` can
    #: give back.
    cpus: int
    #: ``platform.platform()`` of the node ('' if unknown).
    platform: str = ""
    #: Resources available on it, when known.
    avail: DispyNodeAvailInfo | None = None
    #: Where the computation lives for it, if not on the node itself: a shared
    #: scheduler's ``'host:port'`` (the address `recover_jobs` goes back to).
    via: str = ""
    #: CPUs the node offers (dispy's ``DispyNode.avail_cpus``), of which the cluster
    #: uses ``cpus`` (what `NodeAllocate.allocate` returned); 0: as many as it uses.
    offered: int = 0


@dataclass(slots=True)
class Outcome:
    """How a job ended on a node (``JobEvents.job_done``)."""

    #: `JobStatus.Finished` (``result`` is the return value), `JobStatus.Terminated`
    #: (it raised, was killed, crashed, hit a limit: ``exception`` says how) or
    #: `JobStatus.Cancelled`.
    status: JobStatus
    result: Any = None
    #: What the job printed: text (bytes for a program computation's output).
    stdout: str | bytes = ""
    stderr: str | bytes = ""
    #: The remote traceback or the reason, as text (None when it finished).
    exception: str | None = None
    #: Epoch seconds (the node's clock) it started and ended; 0.0 if unknown.
    start_time: float = 0.0
    end_time: float = 0.0


class Departure(enum.Enum):
    """Why a node left (``JobEvents.node_closed``)."""

    #: It went away on its own (crash, network, node shut down, setup failed).
    LOST = "lost"
    #: The cluster let it go: ``close_node``, or the cluster closes.
    RELEASED = "released"
    #: ``resetup_node``: it is set up again and a ``node_ready`` follows.
    RESETUP = "resetup"


@dataclass(slots=True)
class JobRequest:
    """One job for ``Backend.submit``."""

    #: The façade's key for the job: every event about it carries this key.
    key: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: Run only on this node (``submit_node``); None: anywhere.
    node_id: str | None = None
    #: The job's own ``dispy_job_depends`` (files put next to it, objects in its
    #: globals), already collected; None when it has none.
    depends: Dependencies | None = None
    #: Seconds it may run, and bytes of memory it may use (None: no limit).
    timeout: float | None = None
    mem_limit: int | None = None
    #: The backend's own encoding of the job (pickled arguments...), set by
    #: ``Backend.prepare`` for ``Backend.submit``; the façade never reads it.
    payload: Any = None


@dataclass(kw_only=True, eq=False)
class ClusterConfig:
    """What ``Engine.open`` gets besides the events sink."""

    #: The computation's name (the function's ``__name__``, or the program's base
    #: name).
    name: str
    #: Every option as the user gave it, checked and normalised: ``computation``
    #: (a callable, or a program path: feature ``program``), ``setup``,
    #: ``cleanup``, ``nodes``, ``secret``, TLS files, limits... An engine reads what
    #: applies to it.
    options: ClusterOptions
    #: ``options.depends``, collected into files and by-value objects.
    depends: Dependencies
    #: The façade's I/O loop: report every event on its thread.
    runner: LoopRunner
    #: The `JobCluster` itself (what ``NodeAllocate.allocate`` gets as ``cluster``).
    #: Never call it back from the engine.
    cluster: Any = field(repr=False)
    #: Set when the cluster journals for ``recover_jobs`` (feature ``recovery``):
    #: nodes keep the computation's results under this id if the client goes away.
    recovery_id: str | None = None
    #: Whether every job is journaled (``recover_file=...``), not only the nodes.
    journal_jobs: bool = False
    #: Puts the user's files and lines back in place of the ``<dynamic-code>``
    #: frames of a remote traceback the engine logs (setup failed on a worker).
    sources: LazySourceMap | None = None


# -- the protocols -----------------------------------------------------------------


class EngineManagedNodes:
    """The `Backend` methods an engine that manages its own workers (Dask, Ray)
    cannot give: node management and ``send_file`` raise `NotSupportedError`
    (the façade asks only engines with those features, so this is a last guard), and
    ``traffic`` is unknown. Subclasses set ``engine_name`` and ``scale_hint``."""

    #: The engine's name, as in ``Engine.name``.
    engine_name = ""
    #: How the user adds or removes workers instead (one sentence).
    scale_hint = ""

    def _unsupported(self, what: str, instead: str) -> NotSupportedError:
        return NotSupportedError(
            f"{what} is not supported on the {self.engine_name!r} engine: {instead}, "
            "or use dispynb's own node servers (engine=None)"
        )

    def add_nodes(self, specs: list[NodeAllocate]) -> None:
        raise self._unsupported("allocate_node", self.scale_hint)

    def set_cpus(self, node_id: str, cpus: int) -> int:
        raise self._unsupported("set_node_cpus / deallocate_node", self.scale_hint)

    def close_node(self, node_id: str, terminate: bool) -> bool:
        raise self._unsupported("close_node", self.scale_hint)

    def resetup_node(self, node_id: str, terminate: bool) -> bool:
        raise self._unsupported("resetup_node", self.scale_hint)

    def send_file(self, node_id: str, ref: FileRef) -> str:
        raise self._unsupported(
            "send_file",
            "put the file in the cluster's depends (copied to every worker)",
        )

    def traffic(self, node_id: str) -> tuple[int, int]:
        """The engine does not count bytes per worker for this client (it lacks the
        ``traffic`` feature): ``(0, 0)``."""
        return (0, 0)


class JobEvents(Protocol):
    """What a backend reports to the façade (always on ``config.runner``'s thread).

    ``node`` is the `NodeInfo` of the latest ``node_ready`` for that node (or, for a
    job whose node is gone, one with at least ``node_id`` and ``host`` right).
    """

    def node_ready(self, node: NodeInfo) -> None:
        """The computation is set up on ``node``; jobs may go there."""

    def node_status(self, node: NodeInfo, avail: DispyNodeAvailInfo | None) -> None:
        """``node`` reported the resources it has available now."""

    def node_closed(self, node: NodeInfo, reason: str, departure: Departure) -> None:
        """``node`` left (its jobs were requeued or abandoned first)."""

    def node_counts(
        self, node: NodeInfo, jobs_done: int, busy: int, cpu_time: float
    ) -> None:
        """An engine that counts jobs per node itself (a shared scheduler: job
        events name the scheduler, not the node) gives ``node``'s counts now."""

    def jobs_sent(self, keys: list[int], node: NodeInfo) -> None:
        """Jobs were handed to ``node``; they may wait there for a free CPU. Also
        called by a submitting thread that holds the loop (see "Threads")."""

    def job_running(self, key: int, node: NodeInfo, start_time: float) -> None:
        """A job started executing on ``node`` at ``start_time`` (epoch seconds)."""

    def job_provisional(self, key: int, node: NodeInfo, result: Any) -> None:
        """A running job sent a provisional result (``dispy_provisional_result``)."""

    def job_done(self, key: int, node: NodeInfo | None, outcome: Outcome) -> None:
        """A job ended (None: it never reached a node); final for ``key``."""

    def job_abandoned(self, key: int, node: NodeInfo | None, reason: str) -> None:
        """A job cannot run anymore (``node``, where it was sent, was lost, or there
        is no node left to run it); final for ``key``. ``reason`` is shown to the
        user."""

    def job_cancelled(self, key: int) -> None:
        """A job was cancelled before it started; final for ``key``."""

    def jobs_cancelled(self, keys: list[int]) -> None:
        """Jobs were cancelled together before they started (a bulk cancel):
        ``job_cancelled`` of each, in order, in one call."""

    def job_requeued(self, key: int) -> None:
        """A job's node was lost; the job waits to run elsewhere (``reentrant``)."""

    def batch(self) -> AbstractContextManager[None]:
        """``with events.batch():`` around events that came together (the results
        of one message from a node): the façade journals the jobs that end inside
        in one transaction as it exits (``recover_file``), and tells callbacks,
        ``wait()`` and monitors of them then, and raises `JournalError` if they
        could not be journaled (a full disk: the backend must not tell the node they
        were). Optional for a backend; batches may nest."""
        ...


class Backend(Protocol):
    """One cluster's computation, set up on an engine (from ``Engine.open``)."""

    def prepare(self, job: JobRequest) -> None:
        """Check and encode a job before the façade registers it; any thread.

        Sets ``job.payload`` (whatever ``submit`` needs) and has no other effect:
        no event follows. Raises `SerializationError` when the job cannot be sent:
        its arguments do not pickle (the message names the argument) or are over
        the engine's size limit (the message says what to do instead).
        """

    def submit(self, job: JobRequest) -> None:
        """Queue a job that ``prepare`` accepted; never blocks, never raises for the
        job's content, any thread. Its events follow on the loop thread, except
        ``jobs_sent`` when the calling thread sends the job itself while holding
        the loop (see "Threads" above).

        (Two steps so that the façade reports ``Created`` to callbacks and
        listeners after the checks and before any event of the job.)
        """

    def cancel(
        self, keys: list[int], unstarted: bool = False, held: bool = False
    ) -> None:
        """Cancel jobs; never blocks, any thread; unknown or ended keys are ignored.

        A job not started ends with ``job_cancelled``; a running one is terminated
        and ends with ``job_done`` (`JobStatus.Terminated`), or as the engine can.
        With ``unstarted``, running jobs are left alone: a job already handed to a
        node but not started is taken back there (``job_cancelled``) or reported
        started (``job_running``) if it was too late. With ``held`` (the façade
        passes it only on the loop thread), only the jobs no node has yet are
        cancelled, and their ``job_cancelled`` is reported before this returns.
        """

    def node_load(self) -> dict[str, tuple[int, int]]:
        """For each node set up: ``(cpus, jobs)``, the CPUs used for the cluster (0
        once it gets no more jobs) and the jobs handed to it and not yet done.
        ``JobCluster.workload`` (launchers' ``adapt``) reads it; may block briefly.
        """

    def add_nodes(self, specs: list[NodeAllocate]) -> None:
        """Use these nodes too (``allocate_node``; feature ``node_management``).

        A spec may be a wildcard (find matching nodes) or name one node; a known
        node taken out with ``set_cpus(node, 0)`` gets all its CPUs back. Raises
        `DispynbError` or `OSError` when it cannot even start looking.
        """

    def set_cpus(self, node_id: str, cpus: int) -> int:
        """Use ``cpus`` CPUs of a node from now on (0: send it no more jobs).

        Returns the CPUs now used (at most ``NodeInfo.cpus``), -1 for an unknown
        node. Jobs already there finish.
        """

    def close_node(self, node_id: str, terminate: bool) -> bool:
        """Release a node for good (``close_node``): its jobs finish first (or are
        terminated), jobs pinned to it that did not start are cancelled, then
        ``node_closed(..., Departure.RELEASED)``. It comes back only by
        ``add_nodes``. False for an unknown node."""

    def resetup_node(self, node_id: str, terminate: bool) -> bool:
        """Close the computation on a node and set it up again (``NodeAllocate``
        runs again): ``node_closed(..., Departure.RESETUP)`` then ``node_ready``.
        False for an unknown node."""

    def send_file(self, node_id: str, ref: FileRef) -> str:
        """Put a file in the computation's directory on a node; '' or the error."""

    def running_jobs(self, node_id: str) -> list[int]:
        """Keys of the jobs running on a node now (feature ``node_jobs``)."""

    def traffic(self, node_id: str) -> tuple[int, int]:
        """Bytes sent to and received from a node so far, ``(0, 0)`` if unknown;
        never blocks, any thread."""

    def close(self, terminate: bool) -> None:
        """Close the computation everywhere and release the engine's resources.

        ``terminate``: kill running jobs instead of waiting for them. Bounded in
        time; never raises for an engine that went away (log it). After it
        returns, no event is reported any more.
        """


class Engine(Protocol):
    """What ``JobCluster(..., engine=...)`` takes: a way to run a cluster's jobs.

    An engine object holds where to run (a Dask scheduler address, a Ray
    cluster...) and may serve several clusters, one after the other or at once.
    It may also have a ``close()`` method releasing what it holds itself (a
    client, a cluster it started): the notebook session (``%dispy``) calls it when
    it lets the engine go; `JobCluster` never does.
    """

    #: Short name shown in messages: ``'nodes'``, ``'dask'``, ``'ray'``.
    name: str
    #: The feature names (`ALL_FEATURES`) this engine provides.
    features: frozenset[str]

    def open(self, events: JobEvents, config: ClusterConfig) -> Backend:
        """Set the computation up and return its backend; blocks.

        Returns once jobs can be submitted (dispynb's nodes: once a first node is
        ready, or after a short wait when nodes are discovered). Events (such as
        ``node_ready``) may be reported before it returns. Raises a `DispynbError`
        when nothing can run the jobs (`ConfigurationError` for bad options,
        `AuthenticationError`, `SetupError`, `TransportError`...) after releasing
        whatever it started: the façade does not call ``close`` then.
        """
        ...


class _Startable(Protocol):
    """A backend made by an engine's ``open``, to be started before it is used."""

    def start(self) -> None: ...

    def close(self, terminate: bool) -> None: ...


_B = TypeVar("_B", bound=_Startable)


def started(backend: _B) -> _B:
    """``backend`` once its ``start`` returned, for an engine's ``open`` to return.

    A start that raises leaves nothing behind, as `Engine.open` promises: the
    backend is closed (its jobs terminated) and the error raised.
    """
    try:
        backend.start()
    except BaseException:
        backend.close(terminate=True)
        raise
    return backend


def require(engine: Engine, feature: str, what: str) -> None:
    """Raise `NotSupportedError` unless ``engine`` declares ``feature``.

    ``what`` names what the user asked for (``'submit_node'``, ``'setup='``...);
    the error says what to do instead: the engine's own words for ``what`` (its
    ``instead``, a dict, names the engine's own way: Dask's ``scatter``...), else
    to use dispynb's own node servers.
    """
    if feature not in engine.features:
        instead = getattr(engine, "instead", None)
        advice = instead.get(what) if isinstance(instead, dict) else None
        raise NotSupportedError(
            f"{what} is not supported on the {engine.name!r} engine (it lacks the "
            f"{feature!r} feature): "
            + (
                advice
                or "use dispynb's own node servers (engine=None) for it, or do without"
            )
        )


def resolve_engine(engine: Engine | None) -> Engine:
    """``engine``, checked; dispynb's own node servers (`dispynb.backends.nodes`)
    for None (``JobCluster(engine=None)``)."""
    if engine is None:
        from dispynb.backends.nodes import NodeEngine

        return NodeEngine()
    if not callable(getattr(engine, "open", None)) or not isinstance(
        getattr(engine, "features", None), frozenset
    ):
        raise ConfigurationError(
            f"engine={engine!r} is not an engine{_engine_hint(engine)}"
        )
    return engine


def _engine_hint(engine: object) -> str:
    """What to give instead of ``engine`` (not an engine): the engine class for a
    Dask or Ray user's first try (``"dask"``, ``"ray"``, their own Dask client or
    cluster object), else what an engine is."""
    named = engine.lower() if isinstance(engine, str) else ""
    package = type(engine).__module__.partition(".")[0]
    if named == "dask" or package in ("dask", "distributed"):
        return (
            ": for Dask give engine=DaskEngine(ADDRESS) (from dispynb.backends.dask "
            "import DaskEngine; ADDRESS: the scheduler's 'tcp://HOST:8786', or your "
            "distributed.Client or Dask cluster object), or "
            "nodes=LocalCluster(engine='dask') for Dask workers on this machine"
        )
    if named == "ray" or package == "ray":
        return (
            ": for Ray give engine=RayEngine(ADDRESS) (from dispynb.backends.ray "
            "import RayEngine; ADDRESS: the head's 'HOST:6379', 'ray://HOST:10001', "
            "'auto', or None to start Ray here)"
        )
    return (
        " (an object with ``features`` and ``open``, see "
        "dispynb.backends.base.Engine): give None for dispynb's node servers, or an "
        "engine object such as DaskEngine(ADDRESS) or RayEngine(ADDRESS)"
    )


def check_options(engine: Engine, opts: ClusterOptions) -> None:
    """Raise `NotSupportedError` for a `JobCluster` option ``engine`` lacks."""
    if isinstance(opts.computation, str):
        require(engine, PROGRAM, "a program computation")
    if opts.setup is not None:
        require(engine, SETUP, "setup=")
    if callable(opts.cleanup):
        require(engine, SETUP, "cleanup=")
    if opts.job_timeout is not None:
        require(engine, JOB_LIMITS, "job_timeout=")
    if opts.mem_limit is not None:
        require(engine, JOB_LIMITS, "mem_limit=")
    if isinstance(opts.recover_file, str):
        require(engine, RECOVERY, "recover_file=")
    if opts.max_result_size is not None:
        require(engine, RESULT_LIMIT, "max_result_size=")
    if opts.max_pids not in (None, DEFAULT_MAX_PIDS):
        require(engine, PIDS_LIMIT, "max_pids=")
    if opts.result_types is not None:
        require(engine, RESULT_TYPES, "result_types=")
    if opts.fresh_process:
        require(
            engine, FRESH_PROCESS, "fresh_process= (Executor's max_tasks_per_child)"
        )


__all__ = [
    "ALL_FEATURES",
    "FRESH_PROCESS",
    "JOB_DEPENDS",
    "JOB_LIMITS",
    "NODE_JOBS",
    "NODE_MANAGEMENT",
    "PIDS_LIMIT",
    "PROGRAM",
    "RECOVERY",
    "RESULT_LIMIT",
    "RESULT_TYPES",
    "SELECT_NODES",
    "SEND_FILE",
    "SETUP",
    "SUBMIT_NODE",
    "TRAFFIC",
    "Backend",
    "ClusterConfig",
    "Departure",
    "Engine",
    "EngineManagedNodes",
    "JobEvents",
    "JobRequest",
    "NodeInfo",
    "Outcome",
    "check_options",
    "require",
    "resolve_engine",
    "started",
]
