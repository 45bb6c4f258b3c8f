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

import copy
import itertools
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from dispynb import _interruptible, _live, objects
from dispynb._callbacks import CallbackDispatcher
from dispynb._live import live_clusters
from dispynb._loop import LoopRunner
from dispynb.backends import base
from dispynb.backends.base import (
    Backend,
    ClusterConfig,
    Departure,
    Engine,
    JobRequest,
    NodeInfo,
    Outcome,
)
from dispynb.depends import Dependencies, collect, file_ref
from dispynb.errors import (
    ClusterError,
    ConfigurationError,
    DispynbError,
    NoNodesError,
)
from dispynb.job import DispyJob, JobStatus
from dispynb.log import set_level
from dispynb.node import DispyNode, DispyNodeAvailInfo, parse_node_specs
from dispynb.options import (
    ClusterOptions,
    check_callback,
    check_job_timeout,
    check_mem_limit,
)
from dispynb.recovery import ClusterJournal
from dispynb.status import ClusterStatus, NodeWork, Workload, format_status

logger = logging.getLogger(__name__)

#: A listener gets ``(status, node, job)`` for each job and node event; see
#: `JobCluster.add_listener`.
Listener = Callable[[int, DispyNode | None, DispyJob | None], None]


class JobCluster:
    """Run a computation over many inputs on a set of nodes (dispy-compatible).

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
        result.
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
        self._journal = ClusterJournal(
            opts.recover_file, nodes, base.RECOVERY in self._features
        )
        if isinstance(opts.computation, str):
            self.name = os.path.basename(opts.computation)
        else:
            self.name = getattr(computation, "__name__", type(computation).__name__)
        local_secret = getattr(nodes, "secret", None)  # a LocalCluster's own
        if local_secret and not (options.get("secret") or options.get("secret_file")):
            # Its nodes know only that secret: DISPYNB_SECRET(_FILE) is for others.
            opts.secret = (
                local_secret
                if isinstance(local_secret, bytes)  # a launcher's (dispynb.deploy)
                else str(local_secret).encode()
            )
        deps = collect(opts.depends)
        self._jobs: dict[int, DispyJob] = {}
        self._keys = itertools.count(1)
        # Objects put in the cluster (`put`): their handles and the client's files.
        self._objects: dict[str, Any] = {}
        self._objects_dir: str | None = None
        #: Jobs by final status (and "submitted"), for monitors.
        self.job_counts: Counter[str] = Counter()
        self._listeners: list[Listener] = []
        self._outstanding = 0
        self._done = threading.Condition()
        self._nodes: dict[str, DispyNode] = {}
        # CPUs set up on each node (what set_node_cpus counts from), by node id.
        self._node_cpus: dict[str, int] = {}
        # Nodes being set up again (resetup_node), kept with their counts.
        self._resetting: dict[str, DispyNode] = {}
        # Jobs executing now (the node reported their start), by the node counting them
        # in its ``busy``.
        self._executing: dict[int, DispyNode] = {}
        self._closed = False
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
        self._runner = LoopRunner.acquire()
        self._journal.computation(self.name)
        self._id = _live.register(self)
        config = ClusterConfig(
            name=self.name,
            options=opts,
            depends=deps,
            runner=self._runner,
            cluster=self,
            recovery_id=self._journal.recovery_id or None,
            journal_jobs=self._journal.jobs,
        )
        try:
            self._backend = self.engine.open(self, config)
        except BaseException:
            self._callbacks.release()
            self._shutdown(terminate=True)
            raise
        self._callbacks.release()

    def _require(self, feature: str, what: str) -> None:
        """Raise `NotSupportedError` unless the engine provides ``feature``."""
        if feature not in self._features:
            base.require(self.engine, feature, what)

    # -- JobEvents (called by the engine, on the I/O thread) ---------------------------

    def node_ready(self, info: NodeInfo) -> None:
        node = self._resetting.pop(info.node_id, None)
        if node is None:
            node = DispyNode(
                info.host, info.name, info.cpus, port=info.port, platform=info.platform
            )
        else:  # set up again (resetup_node): same node, its counts kept
            node.cpus = node.avail_cpus = info.cpus
            node.update_time = time.time()
        node.avail_info = info.avail
        self._nodes[info.node_id] = node
        self._node_cpus[info.node_id] = info.cpus
        self._journal.node(info.via or info.node_id)
        self._notify_cluster(DispyNode.Initialized, node, None)
        self._emit(DispyNode.Initialized, node, None)

    def node_closed(self, info: NodeInfo, reason: str, departure: Departure) -> None:
        node = self._nodes.pop(info.node_id, None)
        if node is None:
            return
        if departure is Departure.RESETUP:
            self._resetting[info.node_id] = node
        elif self._closed:
            pass
        elif departure is Departure.RELEASED:
            logger.info("node %s released (close_node)", info.node_id)
        else:
            logger.warning("node %s left: %s", info.node_id, reason)
        self._notify_cluster(DispyNode.Closed, node, None)
        self._emit(DispyNode.Closed, node, None)

    def node_status(self, info: NodeInfo, avail: DispyNodeAvailInfo | None) -> None:
        node = self._nodes.get(info.node_id)
        if node is None:
            return
        node.avail_info = avail
        node.update_time = time.time()
        self._notify_cluster(DispyNode.AvailInfo, node, None)
        self._emit(DispyNode.AvailInfo, node, None)

    def node_counts(
        self, info: NodeInfo, jobs_done: int, busy: int, cpu_time: float
    ) -> None:
        node = self._nodes.get(info.node_id)
        if node is None:
            return
        node.jobs_done, node.busy, node.cpu_time = jobs_done, busy, cpu_time
        node.update_time = time.time()
        self._emit(DispyNode.AvailInfo, node, None)

    def jobs_sent(self, keys: list[int], info: NodeInfo) -> None:
        self._journal.sent(keys, info.node_id)

    def job_running(self, key: int, info: NodeInfo, start_time: float) -> None:
        job = self._jobs.get(key)
        # Only once per attempt: a job's start may be reported again after its worker
        # was replaced (it runs again from the start).
        if job is None or job.status is not JobStatus.Created:
            return
        if not job._set_running(info.host, start_time):
            return
        node = self._nodes.get(info.node_id)
        if node is not None:
            node.busy += 1
            self._executing[key] = node
        if self._options.cluster_status is not None:
            self._notify_cluster(JobStatus.Running, node, copy.copy(job))
        self._emit(JobStatus.Running, node, job)

    def _not_executing(self, key: int) -> None:
        """Job ``key`` no longer runs where it was counted busy."""
        node = self._executing.pop(key, None)
        if node is not None:
            node.busy -= 1

    def job_provisional(self, key: int, info: NodeInfo, result: Any) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        if job.status is JobStatus.Created:  # a node that does not report starts
            self.job_running(key, info, time.time())
        if not job._set_provisional(result):
            return
        opts = self._options
        if opts.job_status is not None:
            self._callbacks.post(opts.job_status, copy.copy(job))
        if opts.cluster_status is not None:
            node = self._nodes.get(info.node_id)
            self._notify_cluster(JobStatus.ProvisionalResult, node, copy.copy(job))
        self._emit(JobStatus.ProvisionalResult, self._nodes.get(info.node_id), job)

    def job_done(self, key: int, info: NodeInfo | None, outcome: Outcome) -> None:
        job = self._jobs.pop(key, None)
        if job is None:
            return
        self._not_executing(key)
        run_time = max(outcome.end_time - outcome.start_time, 0.0)
        node = None
        if info is not None and (node := self._nodes.get(info.node_id)) is not None:
            node.jobs_done += 1
            if self._backend is not None:
                node.tx, node.rx = self._backend.traffic(info.node_id)
            node.cpu_time += run_time
        self.cpu_time += run_time
        job._complete(
            outcome.status,
            result=outcome.result,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            exception=outcome.exception,
            start_time=outcome.start_time or None,
            end_time=outcome.end_time or None,
            ip_addr=info.host if info is not None else None,
        )
        self._finished(job, node)

    def job_abandoned(self, key: int, info: NodeInfo | None, reason: str) -> None:
        job = self._jobs.pop(key, None)
        if job is None:
            return
        self._not_executing(key)
        node = self._nodes.get(info.node_id) if info is not None else None
        # The node it was sent to, started or not (dispy sets ip_addr at dispatch).
        ip_addr = info.host if info is not None else None
        job._complete(JobStatus.Abandoned, exception=reason, ip_addr=ip_addr)
        self._finished(job, node)

    def job_requeued(self, key: int) -> None:
        job = self._jobs.get(key)
        if job is not None:
            self._not_executing(key)
            job._requeue()
            self._emit(JobStatus.Created, None, job)

    def job_cancelled(self, key: int) -> None:
        job = self._jobs.pop(key, None)
        if job is not None:
            job._complete(JobStatus.Cancelled, exception="cancelled before it ran")
            self._finished(job, None)

    def _finished(self, job: DispyJob, node: DispyNode | None) -> None:
        opts = self._options
        if self._journal.jobs and job._key is not None:
            self._journal.done(job._key, job)
        if opts.job_status is not None:
            self._callbacks.post(opts.job_status, copy.copy(job))
        if opts.cluster_status is not None:
            self._notify_cluster(job.status, node, copy.copy(job))
        self.job_counts[job.status.name] += 1
        self._emit(job.status, node, job)
        with self._done:
            self._outstanding -= 1
            if self._outstanding == 0:
                self.end_time = time.time()
                self._done.notify_all()

    def _notify_cluster(
        self, status: int, node: DispyNode | None, job: DispyJob | None
    ) -> None:
        if self._options.cluster_status is not None:
            self._callbacks.post(self._options.cluster_status, status, node, job)

    # -- listeners (monitors) ----------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(status, node, job)`` for each job and node event.

        The statuses are ``cluster_status``'s, but a listener is called at once on
        the thread where the event happens (the I/O thread; the submitting thread
        for ``Created``) with the live `DispyJob` and `DispyNode`: it must be quick,
        must not block and must not change them. Monitors use this; programs
        should use ``cluster_status``.
        """
        self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        self._listeners = [fn for fn in self._listeners if fn is not listener]

    def _emit(self, status: int, node: DispyNode | None, job: DispyJob | None) -> None:
        for listener in self._listeners:  # replaced, never mutated: safe to iterate
            try:
                listener(status, node, job)
            except Exception:
                logger.exception("cluster listener %r failed", listener)

    # -- jobs --------------------------------------------------------------------------

    def submit(self, *args: Any, **kwargs: Any) -> DispyJob:
        """Run the computation with these arguments on some node; return its job.

        Raises `SerializationError` (naming the type) if the arguments cannot be
        pickled, and `ClusterError` if the cluster is closed.
        """
        return self._submit(None, None, args, kwargs)

    def put(self, obj: Any) -> objects.ObjectRef:
        """Send ``obj`` to the nodes once for many jobs; return a handle to pass to
        jobs instead of it.

        A job that receives the handle (as an argument, at any depth) sees ``obj``
        itself. Each node receives it once, with the first job that needs it, and
        each worker process loads it once and keeps it for the computation's later
        jobs (so jobs should not modify it). Nodes and client drop it when the
        cluster closes. Raises `SerializationError` if ``obj`` cannot be pickled.
        """
        if self._closed:
            raise ClusterError("this cluster is closed: create a new JobCluster")
        self._require(base.JOB_DEPENDS, "put")
        if self._objects_dir is None:
            self._objects_dir = tempfile.mkdtemp(prefix="dispynb-objects-")
        ref = objects.write(obj, self._objects_dir)
        self._objects[ref.digest] = ref
        return ref

    def _add_object_files(
        self, request: JobRequest, refs: list[objects.ObjectRef]
    ) -> None:
        """A job's arguments hold object handles: their files go with it."""
        for ref in refs:
            if self._objects.get(ref.digest) is not ref:
                raise ClusterError(
                    f"{ref!r} was put in another cluster: put it in this one"
                )
        deps = request.depends or Dependencies()
        known = {f.digest for f in deps.files}
        for ref in refs:
            if ref.digest not in known:
                deps.files.append(ref.file)
                known.add(ref.digest)
        request.depends = deps

    def submit_job_id(self, job_id: Any, *args: Any, **kwargs: Any) -> DispyJob:
        """Like `submit`, with ``job.id`` set to ``job_id``."""
        return self._submit(job_id, None, args, kwargs)

    def submit_node(self, node: Any, *args: Any, **kwargs: Any) -> DispyJob | None:
        """Like `submit`, but run on ``node`` (a `DispyNode`, address or name) only.

        Returns None (and logs why) if ``node`` is not a node of this cluster, as
        dispy does.
        """
        self._require(base.SUBMIT_NODE, "submit_node")
        node_id = self._node_id(node)
        if node_id is None:
            logger.warning("submit_node: %r is not a node of this cluster", node)
            return None
        return self._submit(None, node_id, args, kwargs)

    def submit_job_id_node(
        self, job_id: Any, node: Any, *args: Any, **kwargs: Any
    ) -> DispyJob | None:
        """`submit_node` with ``job.id`` set to ``job_id``."""
        self._require(base.SUBMIT_NODE, "submit_job_id_node")
        node_id = self._node_id(node)
        if node_id is None:
            logger.warning("submit_node: %r is not a node of this cluster", node)
            return None
        return self._submit(job_id, node_id, args, kwargs)

    def _node_id(self, node: Any) -> str | None:
        for node_id, known in list(self._nodes.items()):
            if node is known or node in (node_id, known.ip_addr, known.name):
                return node_id
            if isinstance(node, DispyNode) and (node.ip_addr, node.port) == (
                known.ip_addr,
                known.port,
            ):
                return node_id
        return None

    def _submit(
        self,
        job_id: Any,
        node_id: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> DispyJob:
        backend = self._backend
        if self._closed or backend is None:
            raise ClusterError("this cluster is closed: create a new JobCluster")
        job_deps = None
        depends = kwargs.pop("dispy_job_depends", None)
        if depends:
            self._require(base.JOB_DEPENDS, "dispy_job_depends")
            job_deps = collect(depends, "dispy_job_depends")
        timeout, mem_limit = self._job_limits(kwargs)
        request = JobRequest(0, args, kwargs, node_id, job_deps, timeout, mem_limit)
        with objects.collecting() as refs:
            backend.prepare(request)  # raises SerializationError: nothing registered
        if refs:
            self._add_object_files(request, refs)
        job = DispyJob(job_id, args, kwargs)
        key = request.key = next(self._keys)
        job._key = key
        job._cluster = self  # for job.cancel() / job.future.cancel()
        self._jobs[key] = job
        if self._journal.jobs:
            self._journal.submitted(key, job)
        with self._done:
            self._outstanding += 1
            self.end_time = None
        if self._options.cluster_status is not None:
            self._notify_cluster(JobStatus.Created, None, copy.copy(job))
        self.job_counts["submitted"] += 1
        self._emit(JobStatus.Created, None, job)
        backend.submit(request)
        return job

    def _job_limits(self, kwargs: dict[str, Any]) -> tuple[float | None, int | None]:
        """Pop ``dispy_job_timeout``/``dispy_job_mem_limit``: the job's limits.

        Each falls back to the cluster's ``job_timeout``/``mem_limit``; an explicit
        None lifts the cluster's limit for this job.
        """
        opts = self._options
        timeout, mem = opts.job_timeout, opts.mem_limit
        if "dispy_job_timeout" in kwargs:
            self._require(base.JOB_LIMITS, "dispy_job_timeout")
            timeout = check_job_timeout(
                kwargs.pop("dispy_job_timeout"), "dispy_job_timeout"
            )
        if "dispy_job_mem_limit" in kwargs:
            self._require(base.JOB_LIMITS, "dispy_job_mem_limit")
            mem = check_mem_limit(
                kwargs.pop("dispy_job_mem_limit"), "dispy_job_mem_limit"
            )
        assert not isinstance(mem, str)  # ClusterOptions normalised it to bytes
        return timeout, mem

    def cancel(self, job: DispyJob) -> int:
        """Cancel a job: queued jobs end `Cancelled`, running ones `Terminated`.

        Returns 0, or -1 if the job had already finished.
        """
        if job.done() or job._key is None or job._key not in self._jobs:
            return -1
        if self._backend is not None:
            self._backend.cancel([job._key])
        return 0

    def _cancel_unstarted(self, jobs: list[DispyJob]) -> bool:
        """Cancel ``jobs`` unless they have started (`dispynb.futures.JobFuture`).

        Returns True if the cancels went to the engine: each job then ends
        ``Cancelled`` or is reported started (or done). On the I/O thread itself,
        which cannot wait for nodes, only the jobs no node has yet are cancelled
        (at once) and False is returned.
        """
        keys = [
            job._key
            for job in jobs
            if job._key is not None and not job.done() and job._key in self._jobs
        ]
        backend = self._backend
        if backend is None:
            return False
        if self._runner.in_loop_thread():
            backend.cancel(keys, unstarted=True, held=True)
            return False
        if keys:
            backend.cancel(keys, unstarted=True)
        return True

    def send_file(self, path: str, node: Any, relay: bool = False) -> int:
        """Copy a file into the computation's directory on ``node`` (dispy's method).

        The file keeps its path relative to the current directory when it is below
        it, else its base name. Returns 0, or -1 (with the reason logged) if it could
        not be sent, e.g. over the node's maximum file size. ``relay`` is accepted
        for dispy compatibility.
        """
        self._require(base.SEND_FILE, "send_file")
        node_id = self._node_id(node)
        if node_id is None or self._backend is None:
            logger.warning("send_file: %r is not a node of this cluster", node)
            return -1
        try:
            ref = file_ref(path, "send_file")
        except DispynbError as exc:
            logger.warning("send_file: %s", exc)
            return -1
        error = self._backend.send_file(node_id, ref)
        if error:
            logger.warning("send_file: %s", error)
            return -1
        return 0

    # -- nodes (dispy's node-management methods) ---------------------------------------

    def allocate_node(self, node: Any) -> int:
        """Use ``node`` (any node spec, or several) for this computation.

        A node not yet used is connected and set up; one taken out with
        `deallocate_node` gets jobs again. Returns 0, or -1 for a bad spec (logged).
        """
        self._require(base.NODE_MANAGEMENT, "allocate_node")
        try:
            specs = parse_node_specs(node)
        except ConfigurationError as exc:
            logger.warning("allocate_node: %s", exc)
            return -1
        if self._closed or self._backend is None:
            logger.warning("allocate_node: the cluster is closed")
            return -1
        try:
            self._backend.add_nodes(specs)
        except (OSError, DispynbError) as exc:
            logger.warning("allocate_node: cannot discover nodes: %s", exc)
            return -1
        return 0

    def discover_nodes(self, nodes: Any) -> int:
        """Look for ``nodes``: wildcards by broadcast, explicit hosts by connecting."""
        return self.allocate_node(nodes)

    def _managed(self, node: Any, what: str) -> tuple[Backend, str] | None:
        """The backend and ``node``'s id for a node-management method, or None for
        a node not of this cluster (or a closed cluster)."""
        self._require(base.NODE_MANAGEMENT, what)
        node_id = self._node_id(node)
        if node_id is None or self._backend is None:
            return None
        return self._backend, node_id

    def deallocate_node(self, node: Any) -> int:
        """Send ``node`` no more jobs (its computation stays set up); 0 or -1."""
        managed = self._managed(node, "deallocate_node")
        if managed is None:
            return -1
        backend, node_id = managed
        return 0 if backend.set_cpus(node_id, 0) >= 0 else -1

    def set_node_cpus(self, node: Any, cpus: int) -> int:
        """Use ``cpus`` CPUs of ``node`` (negative: all but that many).

        Returns the CPUs now used, or -1 for an unknown node. A node never gets more
        jobs at once than it set up workers for.
        """
        managed = self._managed(node, "set_node_cpus")
        if managed is None:
            return -1
        backend, node_id = managed
        if cpus < 0:
            cpus = self._node_cpus.get(node_id, 0) + cpus
        used = backend.set_cpus(node_id, cpus)
        known = self._nodes.get(node_id)
        if known is not None and used >= 0:
            known.cpus = known.avail_cpus = used
            self._emit(DispyNode.AvailInfo, known, None)
        return used

    def close_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Close the computation on ``node`` (running its cleanup) and release it.

        Its running jobs finish first (``terminate_pending`` terminates them); jobs
        submitted to it with `submit_node` that have not started are cancelled. The
        node is not set up again for this cluster, not even when discovery finds it
        again, until `allocate_node` names it (or a pattern it matches). Returns 0,
        or -1 if ``node`` is not a node of this cluster.
        """
        managed = self._managed(node, "close_node")
        if managed is None:
            return -1
        backend, node_id = managed
        return 0 if backend.close_node(node_id, terminate_pending) else -1

    def resetup_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Close the computation on ``node`` and set it up again.

        `NodeAllocate.allocate` runs again, so new per-node ``depends`` and
        ``setup_args`` take effect (dispy's way to replace in-memory data).
        """
        managed = self._managed(node, "resetup_node")
        if managed is None:
            return -1
        backend, node_id = managed
        return 0 if backend.resetup_node(node_id, terminate_pending) else -1

    def node_jobs(self, node: Any, from_node: bool = False) -> list[DispyJob]:
        """The jobs of this cluster running on ``node`` now."""
        self._require(base.NODE_JOBS, "node_jobs")
        node_id = self._node_id(node)
        if node_id is None or self._backend is None:
            return []
        keys = self._backend.running_jobs(node_id)
        return [job for key in keys if (job := self._jobs.get(key)) is not None]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job is done; False if ``timeout`` passed first."""
        with self._done:  # in slices: Ctrl-C ends it promptly (`_interruptible`)
            done = _interruptible.wait_for(
                self._done, lambda: self._outstanding == 0, timeout
            )
        if done and not self._callbacks.in_dispatcher_thread():
            self._callbacks.flush(timeout)
        return done

    __call__ = wait

    # -- dispy's attributes ------------------------------------------------------------

    @property
    def job_status(self) -> Callable[[DispyJob], Any] | None:
        """The ``job_status`` callback; may be replaced (None: no callback)."""
        return self._options.job_status

    @job_status.setter
    def job_status(self, callback: Callable[[DispyJob], Any] | None) -> None:
        self._options.job_status = check_callback(callback, "job_status", ["job"])

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
        """The cluster's nodes and the number of jobs not yet done."""
        return ClusterStatus(list(self._nodes.values()), self._outstanding)

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
        self._update_traffic()
        if wall_time is None:
            wall_time = time.time() - self._start_time
        print(format_status(list(self._nodes.values()), wall_time, self._outstanding))

    stats = print_status

    def _update_traffic(self) -> None:
        backend = self._backend
        if backend is None:
            return
        for node_id, node in list(self._nodes.items()):
            node.tx, node.rx = backend.traffic(node_id)

    # -- shutdown ----------------------------------------------------------------------

    def close(self, timeout: float | None = None, terminate: bool = False) -> bool:
        """Wait for the jobs (or cancel them: ``terminate``), then release the nodes.

        Returns True if every job was done before the computation was closed.
        """
        if self._closed:
            return True
        if terminate and self._backend is not None:
            keys = [key for key, job in list(self._jobs.items()) if not job.done()]
            self._backend.cancel(keys)
        done = self.wait(timeout)
        self._shutdown(terminate=terminate or not done)
        return done

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
            self._callbacks.close()
            self._runner.release()
            self._journal.close(clean=not self._jobs)
            for ref in self._objects.values():
                objects.forget(ref)
            if self._objects_dir is not None:
                shutil.rmtree(self._objects_dir, ignore_errors=True)

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
