"""`JobCluster`: dispy's user API, on an engine that runs its jobs.

A cluster ships one computation (a Python function, by value) and runs jobs of it.
The API is synchronous, as dispy's: ``submit`` returns a `DispyJob` at once,
``job()`` blocks for its result, ``wait`` for all of them. This module is dispy's
façade: options, the job table, callbacks, listeners, the journal, status and
dispy's method names. The engine under it (dispynb's node servers by default, see
`dispynb.backends`) is reached only through `dispynb.backends.base`: the façade
knows no wire format, connection or scheduler. Events come on a background I/O
thread; user callbacks run, in order, on another thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from dispynb import _interruptible, _live, objects
from dispynb._callbacks import CallbackDispatcher
from dispynb._clusterevents import EngineEvents, _Batch, _Events
from dispynb._clusterjobs import _Jobs
from dispynb._clusternodes import _Nodes
from dispynb._clusterstate import Listener, _ClusterState
from dispynb._live import live_clusters
from dispynb._loop import LoopRunner
from dispynb._puthint import RepeatedArguments
from dispynb.backends import base
from dispynb.backends.base import Backend, ClusterConfig, Engine
from dispynb.clusterjournal import ClusterJournal
from dispynb.depends import collect
from dispynb.errors import (
    DispynbError,
    NoNodesError,
    SerializationError,
    SetupError,
)
from dispynb.globalwatch import GlobalWatch
from dispynb.job import DispyJob
from dispynb.log import default_level, set_level
from dispynb.node import DispyNode
from dispynb.options import ClusterOptions, check_callback
from dispynb.status import (
    ClusterStatus,
    ComputationName,
    NodeWork,
    Workload,
    format_status,
)
from dispynb.tracebacks import LazySourceMap, missing_module_advice

logger = logging.getLogger(__name__)

#: Seconds ``close(terminate=True)`` waits for the jobs it cancelled to end: well
#: past the 3 s a node gives a job before it kills it
#: (nodeserver.jobstops.CANCEL_GRACE), so only a node that does not answer
#: makes it give up.
TERMINATE_WAIT = 10.0

#: Seconds `JobCluster.print_status` waits for a shared scheduler's report of the
#: jobs ended (it reports every second by default, --pulse_interval).
SETTLE_WAIT = 3.0


# Its parts: `_clusterevents` (the engine's events), `_clusterjobs` (jobs),
# `_clusternodes` (dispy's node methods); their shared state and helpers
# (callbacks, listeners) are in `_clusterstate`. Said here, not in the docstring
# that help(JobCluster) shows a user.
class JobCluster(_Events, _Jobs, _Nodes, _ClusterState):
    """Run a computation over many inputs on a set of nodes (dispy-compatible).

    ``submit(*args)`` runs it on some node and returns a `DispyJob` at once;
    ``job()`` waits for its result, ``wait()`` for every job.

    Parameters
    ----------
    computation:
        A Python function (or any callable) to run for each job; it travels by value,
        with its closures and the functions and classes it uses.
    nodes:
        Where to run: a `LocalCluster`, or node specs (``'host'``, ``'host:port'``,
        `NodeAllocate`, ``(host, port, cpus)`` tuples, dicts, `DispyNode`). A
        ``LocalCluster(engine="dask")`` brings its engine (used when ``engine`` is
        None).
    depends:
        Extra dependencies (functions, classes and modules travel by value).
    job_status:
        ``f(job)``, called on a dedicated thread for each final and provisional
        result. Like all of dispynb's threads it blocks SIGINT, SIGTERM, SIGHUP and
        the other signals Python handles, so that they reach the main thread; a
        program a callback starts inherits that mask (and would ignore SIGTERM):
        start it with ``preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK,
        [])``, or from the main thread.
    cluster_status:
        ``f(status, node, job)``, called on the same thread for node and job events.
    engine:
        What runs the jobs (`dispynb.backends.base.Engine`): None, dispynb's node
        servers (``nodes`` says which); or, for example, a Dask or Ray engine.
        Asking for something the engine lacks raises `NotSupportedError`.
    **options:
        dispy's other keyword arguments (``setup``, ``cleanup``, ``secret``,
        ``secret_file``, ``certfile``, ``keyfile``, ``cafile``, ``reentrant``,
        ``dest_path``, ``loglevel``, ...); see `ClusterOptions`.

    Raises
    ------
    ConfigurationError
        For invalid options, with what to change.
    AuthenticationError, SetupError, TransportError
        When no node could be used; the first node's error is raised, the others
        are logged.

    Examples
    --------
    >>> def square(x):
    ...     return x * x
    >>> with LocalCluster() as local:  # doctest: +SKIP
    ...     with JobCluster(square, nodes=local) as cluster:
    ...         jobs = [cluster.submit(i) for i in range(10)]
    ...         print([job() for job in jobs])
    """

    def __init__(
        self,
        computation: Callable[..., Any] | str,
        nodes: Any = None,
        depends: list[Any] | None = None,
        job_status: Callable[[DispyJob], Any] | None = None,
        cluster_status: Callable[[int, DispyNode | None, DispyJob | None], Any]
        | None = None,
        *,
        engine: Engine | None = None,
        **options: Any,
    ) -> None:
        self._options = opts = ClusterOptions.from_kwargs(
            computation,
            nodes=nodes,
            depends=depends if depends is not None else [],
            job_status=job_status,
            cluster_status=cluster_status,
            **options,
        )
        if engine is None:  # a LocalCluster on another engine brings it
            engine = getattr(nodes, "engine", None)
        self.engine: Engine = base.resolve_engine(engine)
        self._features = self.engine.features
        base.check_options(self.engine, opts)
        if opts.loglevel is not None:
            set_level(opts.loglevel)
        else:
            default_level()
        self._journal = ClusterJournal(
            opts.recover_file, nodes, base.RECOVERY in self._features
        )
        if isinstance(opts.computation, str):
            name = os.path.basename(opts.computation)
        else:
            name = getattr(computation, "__name__", type(computation).__name__)
        self.name = ComputationName(name)  # also dispy's name() method
        local_secret = getattr(nodes, "secret", None)  # a LocalCluster's own
        if local_secret and not (options.get("secret") or options.get("secret_file")):
            # Its nodes know only that secret: DISPYNB_SECRET(_FILE) is for others.
            opts.secret = (
                local_secret
                if isinstance(local_secret, bytes)  # a launcher's (dispynb.deploy)
                else str(local_secret).encode()
            )
        deps = collect(opts.depends)
        # Remote tracebacks read <dynamic-code> for code sent by value: put the
        # script's file and lines back, as a local traceback shows them.
        self._sources = LazySourceMap(
            opts.computation,
            opts.setup,
            opts.cleanup,
            *opts.depends,
            files=[(ref.relative, ref.path) for ref in deps.files],
        )
        self._jobs: dict[int, DispyJob] = {}
        self._keys = itertools.count(1)
        # Objects put in the cluster (`put`): their handles and the client's files.
        self._objects: dict[str, Any] = {}
        self._objects_dir: str | None = None
        self._repeats = RepeatedArguments()  # a hint at put for arguments sent again
        #: Jobs by final status (and "submitted"), for monitors.
        self.job_counts: Counter[str] = Counter()
        self._listeners: list[Listener] = []
        self._outstanding = 0  # jobs submitted, not yet done
        self._submitted = 0  # jobs submitted ever: `wait` sees if callbacks did
        self._outstanding_lock = threading.Lock()
        self._all_done = _interruptible.Sleepers()  # `wait`: woken as it reaches 0
        self._nodes: dict[str, DispyNode] = {}
        # CPUs set up on each node (what set_node_cpus counts from), by node id.
        self._node_cpus: dict[str, int] = {}
        # Nodes deallocate_node took out (until allocate_node or set_node_cpus gives
        # them CPUs again): submit_node refuses them, as dispy's.
        self._deallocated: set[str] = set()
        # What deallocate_node (None) or set_node_cpus left each node, by id, until
        # allocate_node, close_node, resetup_node or its loss: applied again as a
        # node closed and allocated again a moment before is ready (the last call
        # decides; the engine keeps it too).
        self._limits_pending: dict[str, int | None] = {}
        # Nodes being set up again (resetup_node), kept with their counts.
        self._resetting: dict[str, DispyNode] = {}
        # Nodes close_node released, with their counts: print_status still lists
        # them, as dispy's (whose cluster keeps a closed node).
        self._released_nodes: dict[str, DispyNode] = {}
        # When cluster_status was last told a node's AvailInfo (`_Events._node_status`).
        self._avail_told: dict[str, float] = {}
        # Jobs executing now (the node reported their start), by the node counting them
        # in its ``busy``.
        self._executing: dict[int, DispyNode] = {}
        # Jobs a cancel was asked for and not yet announced ended: a listener (a
        # notebook's run) tells a job terminated on request from one that failed.
        self._cancel_asked: set[int] = set()
        # Results that arrive together are journaled together (`_Events._batch`).
        self._batch_context = _Batch(self)
        self._batch_depth = 0
        self._ending: list[tuple[int, DispyJob, DispyNode | None]] = []
        self._closed = False
        #: At interpreter exit, terminate the jobs not done instead of waiting for
        #: them as dispy does (`dispynb._live`; an `Executor`'s cluster: as
        #: documented there).
        self.terminate_at_exit = False
        self._backend: Backend | None = None
        #: Epoch seconds the cluster was created, and the last time every job
        #: submitted had ended (None while jobs are pending), as in dispy.
        self.start_time = self._start_time = time.time()
        self.end_time: float | None = None
        #: Seconds of job run time on the nodes, over all jobs done.
        self.cpu_time = 0.0
        self.uid = secrets.token_hex(6)
        # Callbacks wait until the constructor returns: dispy programs use the
        # cluster's variable in them (cluster_status calling cluster.submit_node).
        self._callbacks = CallbackDispatcher(held=True)
        if opts.job_status is not None or opts.cluster_status is not None:
            # Now: a script's jobs may end at interpreter exit, where Python
            # 3.12.0 and 3.12.1 start no thread (`dispynb._callbacks`).
            self._callbacks.start()
        self._runner = LoopRunner.acquire()
        self._journal.computation(name, self._sources)
        self._id = _live.register(self)
        config = ClusterConfig(
            name=name,
            options=opts,
            depends=deps,
            runner=self._runner,
            cluster=self,
            recovery_id=self._journal.recovery_id or None,
            journal_jobs=self._journal.jobs,
            sources=self._sources,
        )
        # What the computation's globals are as it is sent: submit warns of one
        # the program rebinds later (its jobs would not see it).
        self._globals = GlobalWatch(opts.computation, opts.setup, opts.cleanup)
        try:
            self._backend = self.engine.open(EngineEvents(self), config)
        except BaseException as exc:
            self._callbacks.release()
            self._shutdown(terminate=True)
            if isinstance(exc, SetupError) and exc.remote_traceback.startswith(
                "Traceback"
            ):  # the user's setup failed there: show its frames, as a local one
                shown = self._sources.rerender(exc.remote_traceback) or ""
                exc.add_note(f"\nThe node's traceback:\n{shown.rstrip()}")
            if isinstance(exc, SetupError) and (
                advice := missing_module_advice(exc.remote_traceback)
            ):  # a module of the script's, which the nodes lack: how to send it
                exc.add_note(advice)
            if isinstance(exc, SerializationError):  # names the culprit and the fix;
                raise exc.with_traceback(None) from exc.__cause__  # not where found
            raise
        self._callbacks.release()
        serving = getattr(nodes, "serving", None)  # a LocalCluster: it closes us first
        if serving is not None:
            serving(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job is done; False if ``timeout`` passed first.

        Out of a callback, it also waits for the callbacks of the jobs done, and for
        the jobs those callbacks submit (dispy's ``job_scheduler`` example submits
        the next job as one ends), within the same ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            while True:
                done = self._all_done.wait_for(lambda: self._outstanding == 0, left())
                if not done or self._callbacks.in_dispatcher_thread():
                    return done
                submitted = self._submitted
                if not self._callbacks.flush(left()):
                    return False  # every job is done, but not yet their callbacks
                # Done if the callbacks submitted nothing: a job one submitted may
                # have ended already, its own callback posted after this flush's.
                if self._outstanding == 0 and self._submitted == submitted:
                    return True
        except KeyboardInterrupt as interrupted:  # Ctrl-C: shown at the user's call
            _interruptible.at_the_call(interrupted)  # at the user's line
            raise

    __call__ = wait

    # -- dispy's attributes ------------------------------------------------------------

    @property
    def job_status(self) -> Callable[[DispyJob], Any] | None:
        """The ``job_status`` callback; may be replaced (None: no callback)."""
        return self._options.job_status

    @job_status.setter
    def job_status(self, callback: Callable[[DispyJob], Any] | None) -> None:
        self._options.job_status = check_callback(callback, "job_status", ["job"])
        if callback is not None:
            self._callbacks.start()  # as in the constructor

    @property
    def cluster_status(
        self,
    ) -> Callable[[int, DispyNode | None, DispyJob | None], Any] | None:
        """The ``cluster_status`` callback; may be replaced (None: no callback)."""
        return self._options.cluster_status

    @cluster_status.setter
    def cluster_status(
        self, callback: Callable[[int, DispyNode | None, DispyJob | None], Any] | None
    ) -> None:
        self._options.cluster_status = check_callback(
            callback, "cluster_status", ["status", "node", "job"]
        )
        if callback is not None:
            self._callbacks.start()  # as in the constructor

    @property
    def pulse_interval(self) -> float | None:
        """Seconds between the nodes' pulses, as given (None: dispynb's default)."""
        return self._options.pulse_interval

    @property
    def ping_interval(self) -> float | None:
        """Seconds between discovery pings, as given (None: one ping)."""
        return self._options.ping_interval

    @property
    def poll_interval(self) -> float | None:
        """dispy's ``poll_interval``, as given (nodes never need polling here: they
        send results over the client's own connection)."""
        return self._options.poll_interval

    # -- status ------------------------------------------------------------------------

    def status(self) -> ClusterStatus:
        """The cluster's nodes (those being set up again too, as dispy's) and the
        number of jobs not yet done."""
        return ClusterStatus(self._listed_nodes(), self._outstanding)

    def _listed_nodes(self) -> list[DispyNode]:
        """The nodes `status` lists: the cluster's, and those `resetup_node` sets
        up again (dispy's keeps them)."""
        nodes = dict(self._resetting)
        nodes.update(self._nodes)
        return list(nodes.values())

    def workload(self) -> Workload:
        """Jobs waiting for a node and each node's load (launchers' ``adapt`` reads
        it to grow and shrink the nodes; `close_node` drains one)."""
        backend = self._backend
        if self._closed or backend is None:
            return Workload(0, {})
        nodes = {}
        for node_id, (cpus, jobs) in backend.node_load().items():
            node = self._nodes.get(node_id)
            nodes[node_id] = NodeWork(cpus, jobs, node.jobs_done if node else 0)
        sent = sum(work.jobs for work in nodes.values())
        return Workload(max(0, self._outstanding - sent), nodes)

    def print_status(self, wall_time: float | None = None) -> None:
        """Print dispy's per-node table of jobs, times and traffic."""
        settle = getattr(self._backend, "settle_counts", None)
        if settle is not None and not self._outstanding:
            # A shared scheduler's counts come in its reports, after the results:
            # the table of a run that ended counts all its jobs, as dispy's.
            settle(SETTLE_WAIT)
        self._update_traffic()
        if wall_time is None:
            wall_time = time.time() - self._start_time
        nodes = self._listed_nodes() + [
            node
            for node_id, node in self._released_nodes.items()
            if node_id not in self._nodes and node_id not in self._resetting
        ]
        traffic = base.TRAFFIC in self._features
        print(format_status(nodes, wall_time, self._outstanding, traffic=traffic))

    stats = print_status

    def _update_traffic(self) -> None:
        backend = self._backend
        if backend is None:
            return
        for node_id, node in list(self._nodes.items()):
            node.tx, node.rx = backend.traffic(node_id)

    # -- shutdown ----------------------------------------------------------------------

    def close(self, timeout: float | None = None, terminate: bool = False) -> bool:
        """Close the cluster once its jobs are done, as dispy's; True once closed.

        Without ``terminate`` it waits for every job. If ``timeout`` seconds pass
        first it returns False and the cluster stays open, its jobs going on, as
        dispy's: wait again (``wait``, another ``close``), or ``close(terminate=True)``.

        With ``terminate`` the jobs get ``timeout`` seconds to finish, as in dispy
        (none if None: dispy's would wait for them all, against its own docstring);
        then the jobs not done are cancelled (queued ones dropped, running ones
        terminated by their nodes) and `_terminate` closes the cluster, bounded:
        it returns True.
        """
        if self._closed:
            return True
        try:
            if not terminate:
                if not self.wait(timeout):
                    return False
                self._shutdown(terminate=False)
                return True
            if timeout is not None and self.wait(timeout):
                self._shutdown(terminate=False)
                return True
            self._terminate(TERMINATE_WAIT)
        except KeyboardInterrupt as interrupted:  # Ctrl-C: shown at the user's call
            _interruptible.at_the_call(interrupted)  # at the user's line
            raise
        return True

    def _terminate(self, wait: float) -> None:
        """Cancel the jobs not done, wait at most ``wait`` seconds for them to end,
        then close the nodes: a node that does not answer (stopped, cut off one
        way, declared dead only after 3 of a long ``pulse_interval``) holds it no
        longer. Jobs still not done then are abandoned, named in one warning; with
        no ``wait`` (a second Stop: `dispynb.jupyter.runstop`), none is: the nodes
        end them with the computation, and say so as it closes."""
        if self._closed:
            return
        # As a cancel the caller asked for (`_cancel_all`): a job it terminates is
        # no failure for monitors and the lab panel (a Stop in a with-block).
        self._cancel_all(list(self._jobs.values()))
        if wait > 0 and not self.wait(wait):
            self._warn_abandoned(wait)
        self._shutdown(terminate=True)

    def _warn_abandoned(self, waited: float | None) -> None:
        """One warning naming the jobs `close` gives up on (ten at most)."""
        left = [job for job in list(self._jobs.values()) if not job.done()]
        if not left:
            return
        named = ", ".join(
            f"{job.id!r}" + (f" on {job.ip_addr}" if job.ip_addr else " (queued)")
            for job in left[:10]
        )
        more = f" and {len(left) - 10} more" if len(left) > 10 else ""
        logger.warning(
            "close: %d job(s) not done after %g s abandoned, their nodes closed "
            "(jobs %s%s)",
            len(left),
            waited,
            named,
            more,
        )

    def shutdown(self) -> None:
        """dispy's name for `close`."""
        self.close()

    def _shutdown(self, terminate: bool) -> None:
        if self._closed:
            return
        self._closed = True
        _live.unregister(self._id, self)
        try:
            self._update_traffic()
            if self._backend is not None:
                self._backend.close(terminate)
        except (DispynbError, RuntimeError) as exc:
            logger.warning("closing the cluster: %s", exc)
        finally:
            try:
                # What the nodes did not end, closed now, never ends: Abandoned (the
                # engine's loop is idle, its connections closed), so no job() or
                # wait() blocks for ever and the callbacks hear of them.
                for key in [k for k, job in list(self._jobs.items()) if not job.done()]:
                    self._job_abandoned(
                        key, None, "the cluster was closed before its node ended it"
                    )
                # Waits for the callbacks still running (a cluster_status told of
                # the nodes' Closed): a Ctrl-C there leaves the rest to do still.
                self._callbacks.close()
            finally:
                self._release()

    def _release(self) -> None:
        """The last of `_shutdown`, each step done even if one before was
        interrupted: the I/O loop, the recovery file (removed when no job was left
        to recover), the objects put in the cluster."""
        try:
            self._runner.release()
        finally:
            try:
                self._journal.close(clean=not self._jobs)
            finally:
                for ref in self._objects.values():
                    objects.forget(ref)
                if self._objects_dir is not None:
                    objects.remove_directory(self._objects_dir)

    def __enter__(self) -> JobCluster:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Close the cluster: after the with-block, wait for the jobs submitted and
        release the nodes, as dispy's ``__exit__`` does.

        If the block raised, the exception propagates and the jobs still pending are
        terminated. dispy instead waits for them and then swallows the exception
        (its ``__exit__`` returns True), so a failing program runs on as if nothing
        happened; dispynb does not copy that (a known dispy bug), and without it
        waiting would only delay the error, for results nobody reads.
        """
        self.close(terminate=exc_type is not None)

    def _repr_html_(self) -> str:
        """Rich display in notebooks (`dispynb.reprs`)."""
        from dispynb.reprs import cluster_html

        return cluster_html(self)

    def __repr__(self) -> str:
        nodes, pending = len(self._nodes), self._outstanding
        return f"<JobCluster {self.name!r} nodes={nodes} pending={pending}>"


class ClusterFactory(Protocol):
    """Makes a cluster for the layers above the façade (`dispynb.jupyter.Run.map`,
    ``%%dispy``, `dispynb.Executor`): they ask for a cluster, never name a class or
    an engine. `new_cluster` is the default."""

    def __call__(
        self,
        computation: Callable[..., Any] | str,
        /,
        *,
        nodes: Any = None,
        engine: Engine | None = None,
        **options: Any,
    ) -> JobCluster:
        """A cluster running ``computation`` on ``engine`` (None: node servers)."""
        ...


def new_cluster(
    computation: Callable[..., Any] | str,
    /,
    *,
    nodes: Any = None,
    engine: Engine | None = None,
    **options: Any,
) -> JobCluster:
    """The default `ClusterFactory`: ``JobCluster(computation, nodes=nodes,
    engine=engine, **options)``."""
    return JobCluster(computation, nodes=nodes, engine=engine, **options)


__all__ = [
    "ClusterFactory",
    "ClusterStatus",
    "JobCluster",
    "Listener",
    "NoNodesError",
    "format_status",
    "live_clusters",
    "new_cluster",
]
