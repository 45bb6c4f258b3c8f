"""`JobCluster`: dispy's user API, run on dispynb's engine.

A cluster ships one computation (a Python function, by value) to its nodes and runs
jobs of it. The API is synchronous, as dispy's: ``submit`` returns a `DispyJob`
at once, ``job()`` blocks for its result, ``wait`` for all of them. The sockets live
on a background I/O thread; user callbacks run, in order, on another thread.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import itertools
import logging
import os
import secrets
import socket
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

from dispynb._callbacks import CallbackDispatcher
from dispynb._loop import Coalescer, LoopRunner
from dispynb.defaults import MAX_MESSAGE_SIZE, NODE_PORT
from dispynb.depends import FileRef, collect, file_ref
from dispynb.errors import (
    ClusterError,
    ConfigurationError,
    DispynbError,
    NoNodesError,
    ProtocolError,
    SerializationError,
)
from dispynb.finder import NodeFinder
from dispynb.job import DispyJob, JobStatus
from dispynb.journal import Journal
from dispynb.node import (
    DispyNode,
    DispyNodeAvailInfo,
    NodeAllocate,
    is_wildcard,
    parse_node_specs,
)
from dispynb.options import (
    ClusterOptions,
    check_callback,
    check_job_timeout,
    check_mem_limit,
)
from dispynb.protocol import serialize
from dispynb.protocol.files import write_inside
from dispynb.protocol.framing import Buffer
from dispynb.protocol.messages import Welcome
from dispynb.recovery import acquire_default_journal, release_default_journal
from dispynb.scheduler.driver import Allocator, Driver, DriverConfig, NodeLink, Outcome
from dispynb.status import (
    ClusterStatus,
    NodeWork,
    Workload,
    format_status,
    status_of,
)
from dispynb.transport.addressing import format_address, parse_address
from dispynb.transport.tls import client_context

logger = logging.getLogger(__name__)

_comp_ids = itertools.count(1)

#: A listener gets ``(status, node, job)`` for each job and node event; see
#: `JobCluster.add_listener`.
Listener = Callable[[int, DispyNode | None, DispyJob | None], None]

#: Open clusters of this process by creation order, for monitors (weak: a cluster
#: that is garbage-collected without being closed just disappears).
_live: dict[int, weakref.ref[JobCluster]] = {}

#: Seconds nodes keep the results of a computation whose client (with a
#: ``recover_file``) went away, for `recover_jobs`.
RECOVERY_KEEP = 3600.0

#: Seconds `JobCluster()` waits for a first discovered node (nodes found later are
#: used as they come).
DISCOVERY_WAIT = 2.0

#: Seconds a cluster left open waits at interpreter exit for its cancelled jobs.
EXIT_WAIT = 10.0

#: Seconds `JobCluster()` waits for a first node to be set up. Connection and
#: authentication errors surface within this time; a longer ``setup`` keeps running
#: after the constructor returns, and jobs wait for it.
STARTUP_WAIT = 15.0


class JobCluster:
    """Run a computation over many inputs on a set of nodes (dispy-compatible).

    Parameters
    ----------
    computation:
        A Python function (or any callable) to run for each job; it travels by value,
        with its closures and the functions and classes it uses.
    nodes:
        Where to run: a `LocalCluster`, or node specs (``'host'``, ``'host:port'``,
        `NodeAllocate`, ``(host, port, cpus)`` tuples, dicts, `DispyNode`).
    depends:
        Extra dependencies (functions, classes and modules travel by value).
    job_status:
        ``f(job)``, called on a dedicated thread for each final and provisional
        result.
    cluster_status:
        ``f(status, node, job)``, called on the same thread for node and job events.
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
        self._program: dict[str, Any] | None = None
        if isinstance(opts.computation, str):
            self._program = _read_program(opts.computation)
        if opts.loglevel is not None:
            _set_log_level(opts.loglevel)
        self._journal: Journal | None = None
        self._recovery_id = ""
        # Every job is journaled with recover_file=...; dispy's default recovery file
        # holds the computation and its nodes only (no cost per job).
        self._journal_jobs = isinstance(opts.recover_file, str)
        if isinstance(opts.recover_file, str):
            self._journal = Journal(opts.recover_file)
        elif opts.recover_file is None and _default_recovery_applies(nodes):
            self._journal = acquire_default_journal()
        if self._journal is not None:
            self._recovery_id = secrets.token_hex(16)
        # As in dispy, no nodes means: discover them on the local networks.
        self._specs = parse_node_specs(nodes) or parse_node_specs("*")
        wildcards = [spec for spec in self._specs if is_wildcard(spec)]
        self._finder: NodeFinder | None = None
        if wildcards:
            host = opts.host[0] if isinstance(opts.host, list) else opts.host
            self._finder = NodeFinder(
                wildcards,
                self._use_found_node,
                host=host,
                multicast=opts.ipv4_udp_multicast,
                ping_interval=opts.ping_interval,
                ready=lambda: bool(self._nodes),
            )
        if self._program is not None:
            self.name = self._program["name"]
        else:
            self.name = getattr(computation, "__name__", type(computation).__name__)
        secret = opts.secret
        local_secret = getattr(nodes, "secret", None)  # a LocalCluster's own
        if local_secret and not (options.get("secret") or options.get("secret_file")):
            # Its nodes know only that secret: DISPYNB_SECRET(_FILE) is for others.
            secret = (
                local_secret
                if isinstance(local_secret, bytes)  # a launcher's (dispynb.deploy)
                else str(local_secret).encode()
            )
        tls = bool(opts.certfile or opts.cafile) or bool(getattr(nodes, "tls", False))
        serialize.ship_by_value(
            opts.computation, opts.setup, opts.cleanup, *opts.depends
        )
        self._deps = collect(opts.depends)
        self._jobs: dict[int, DispyJob] = {}
        self._keys = itertools.count(1)
        #: Jobs by final status (and "submitted"), for monitors.
        self.job_counts: Counter[str] = Counter()
        self._listeners: list[Listener] = []
        self._outstanding = 0
        self._done = threading.Condition()
        self._nodes: dict[str, DispyNode] = {}
        # Nodes being set up again (resetup_node), kept with their counts.
        self._resetting: dict[str, DispyNode] = {}
        # Node ids released by close_node: discovery does not bring them back.
        self._released: set[str] = set()
        # Jobs executing now (the node reported their start), by the node counting them
        # in its ``busy``.
        self._executing: dict[int, DispyNode] = {}
        self._node_errors: list[DispynbError] = []
        self._launcher: Any = None  # a launcher (dispynb.deploy) it subscribed to
        self._closed = False
        self._max_job_size = MAX_MESSAGE_SIZE
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
        self._driver = Driver(
            DriverConfig(
                comp_id=next(_comp_ids),
                name=self.name,
                secret=secret,
                max_message_size=opts.max_message_size,
                ssl_context=client_context(opts.certfile, opts.keyfile, opts.cafile)
                if tls
                else None,
                dest_path=opts.dest_path,
                cleanup=bool(opts.cleanup),
                reentrant=opts.reentrant,
                max_attempts=opts.max_attempts,
                pulse_interval=opts.pulse_interval,
                setup_timeout=opts.setup_timeout,
                recovery_id=self._recovery_id or None,
                keep_results=RECOVERY_KEEP if self._journal else 0.0,
                keep_sent=self._journal_jobs,
                client_name=_client_name(),
                max_output=opts.max_output_size,  # type: ignore[arg-type]
                max_result=_result_cap(opts),
                max_pids=opts.max_pids,
                fresh_process=opts.fresh_process,
                result_types=None
                if opts.result_types is None
                else serialize.AllowList(opts.result_types),
            ),
            self,
        )
        if self._journal is not None:
            self._journal.computation(self._recovery_id, self.name)
        self._drain = Coalescer(self._runner, self._driver.drain)
        _live[self._driver.config.comp_id] = weakref.ref(self)
        _close_at_exit_once()
        try:
            self._runner.run_sync(self._start)
            self._subscribe(nodes)
        except BaseException:
            self._callbacks.release()
            self._shutdown(terminate=True)
            raise
        self._callbacks.release()

    # -- start-up ------------------------------------------------------------------

    async def _start(self) -> None:
        self._startup = asyncio.get_running_loop().create_future()
        explicit = [spec for spec in self._specs if not is_wildcard(spec)]
        for spec in explicit:
            self._driver.add_node(
                spec.host, spec.port or NODE_PORT, self._allocator(spec)
            )
        wait = STARTUP_WAIT
        if self._finder is not None:
            self._driver.discovering = True  # nodes may appear at any time
            try:
                await self._finder.start()
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot start node discovery ({exc}): name the nodes instead"
                ) from exc
            if not explicit:
                wait = DISCOVERY_WAIT
        try:
            await asyncio.wait_for(asyncio.shield(self._startup), wait)
        except TimeoutError:
            self._startup.cancel()  # later node failures reach the jobs instead
            logger.info("nodes are still being set up; jobs will wait for them")

    def _subscribe(self, nodes: Any) -> None:
        """A launcher (`dispynb.deploy.NodeLauncher`): nodes that register later are
        used like discovered ones."""
        subscribe = getattr(nodes, "subscribe", None)
        if not callable(subscribe):
            return
        self._on_loop(setattr, self._driver, "discovering", True)
        subscribe(self._use_registered_node, cluster=self)
        self._launcher = nodes

    def _use_registered_node(self, ip: str, port: int) -> None:
        """A launched node registered: connect to it (on the I/O loop)."""
        self._use_found_node(ip, port, parse_node_specs(format_address(ip, port))[0])

    def _use_found_node(self, ip: str, port: int, spec: NodeAllocate) -> None:
        """A discovered node matched ``spec``: connect to it (on the I/O loop)."""
        node_id = format_address(ip, port)
        if (
            node_id not in self._driver.nodes
            and node_id not in self._released
            and not self._closed
        ):
            self._driver.add_node(ip, port, self._allocator(spec))

    def _allocator(self, spec: NodeAllocate) -> Allocator:
        opts = self._options

        def allocate(
            welcome: Welcome, peer_ip: str
        ) -> tuple[int, list[Buffer], list[FileRef]]:
            try:
                cpus = spec.allocate(
                    self,
                    peer_ip,
                    welcome.name,
                    welcome.cpus,
                    avail_info=_avail_info(welcome.avail),
                    platform=welcome.platform,
                )
                # allocate() may set per-node depends and setup_args (dispy examples do)
                node_deps = collect(spec.depends, "NodeAllocate.depends")
            except DispynbError:
                raise
            except Exception as exc:
                raise ConfigurationError(
                    f"NodeAllocate.allocate raised {exc!r}"
                ) from exc
            self._max_job_size = min(self._max_job_size, welcome.max_message_size)
            bundle = {
                "func": None if self._program else opts.computation,
                "program": self._program,
                "setup": opts.setup,
                "cleanup": opts.cleanup if callable(opts.cleanup) else None,
                "setup_args": tuple(spec.setup_args),
                "names": {**self._deps.names, **node_deps.names},
            }
            files = self._deps.files + node_deps.files
            return int(cpus or 0), serialize.dumps(bundle), files

        return allocate

    # -- JobEvents (called on the I/O thread) -----------------------------------------

    def node_ready(self, link: NodeLink) -> None:
        welcome = link.welcome
        node = self._resetting.pop(link.node_id, None)
        if node is None:
            node = DispyNode(
                link.host,
                welcome.name if welcome else "",
                link.cpus,
                port=link.port,
                platform=welcome.platform if welcome else "",
            )
        else:  # set up again (resetup_node): same node, its counts kept
            node.cpus = node.avail_cpus = link.cpus
            node.update_time = time.time()
        node.avail_info = _avail_info(welcome.avail) if welcome else None
        self._nodes[link.node_id] = node
        if self._journal is not None:
            self._journal.node(self._recovery_id, link.node_id)
        if not self._startup.done():
            self._startup.set_result(None)
        self._notify_cluster(DispyNode.Initialized, node, None)
        self._emit(DispyNode.Initialized, node, None)

    def node_failed(self, link: NodeLink, error: DispynbError) -> None:
        self._node_errors.append(error)
        if (
            not self._startup.done()
            and not self._driver.connecting
            and not any(link.ready for link in self._driver.nodes.values())
        ):
            first = self._node_errors[0]
            if len(self._node_errors) > 1:
                logger.error(
                    "no node could be used: %s",
                    "; ".join(str(e) for e in self._node_errors),
                )
            self._startup.set_exception(first)

    def node_closed(self, link: NodeLink, reason: str) -> None:
        if self._finder is not None and not link.resetting:
            self._finder.forget(link.host, link.port)
        node = self._nodes.pop(link.node_id, None)
        if node is not None:
            if link.resetting:
                self._resetting[link.node_id] = node
            elif link.releasing:
                logger.info("node %s released (close_node)", link.node_id)
            elif not self._closed:
                logger.warning("node %s left: %s", link.node_id, reason)
            self._notify_cluster(DispyNode.Closed, node, None)
            self._emit(DispyNode.Closed, node, None)

    def node_status(self, link: NodeLink, avail: list[float]) -> None:
        node = self._nodes.get(link.node_id)
        if node is None:
            return
        node.avail_info = _avail_info(avail)
        node.update_time = time.time()
        self._notify_cluster(DispyNode.AvailInfo, node, None)
        self._emit(DispyNode.AvailInfo, node, None)

    def jobs_sent(self, keys: list[int], link: NodeLink) -> None:
        if self._journal is not None and self._journal_jobs:
            for key in keys:
                self._journal.sent(self._recovery_id, key, link.node_id)

    def job_running(self, key: int, link: NodeLink, start_time: float) -> None:
        job = self._jobs.get(key)
        # Only once per attempt: a job's start may be reported again after its worker
        # was replaced (it runs again from the start).
        if job is None or job.status is not JobStatus.Created:
            return
        if not job._set_running(link.host, start_time):
            return
        node = self._nodes.get(link.node_id)
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

    def job_provisional(self, key: int, link: NodeLink, result: Any) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        if job.status is JobStatus.Created:  # a node that does not report starts
            self.job_running(key, link, time.time())
        if not job._set_provisional(result):
            return
        opts = self._options
        if opts.job_status is not None:
            self._callbacks.post(opts.job_status, copy.copy(job))
        if opts.cluster_status is not None:
            node = self._nodes.get(link.node_id)
            self._notify_cluster(JobStatus.ProvisionalResult, node, copy.copy(job))
        self._emit(JobStatus.ProvisionalResult, self._nodes.get(link.node_id), job)

    def job_file(
        self, key: int, link: NodeLink, path: str, data: list[memoryview]
    ) -> None:
        base = self._options.files_dir or os.getcwd()
        try:
            if len(data) != 1:
                raise ProtocolError("a file from a node comes in one buffer")
            saved = write_inside(base, path, data[0])
        except (DispynbError, OSError) as exc:
            logger.warning("file %r from job %d not saved: %s", path, key, exc)
            return
        logger.info("saved %s from node %s", saved, link.node_id)

    def job_done(self, key: int, link: NodeLink | None, outcome: Outcome) -> None:
        job = self._jobs.pop(key, None)
        if job is None:
            return
        status = status_of(outcome.outcome)
        self._not_executing(key)
        node = self._nodes.get(link.node_id) if link is not None else None
        if node is not None:
            node.jobs_done += 1
            if link is not None and link.conn is not None:
                node.tx, node.rx = link.conn.bytes_sent, link.conn.bytes_received
            node.cpu_time += max(outcome.end_time - outcome.start_time, 0.0)
        self.cpu_time += max(outcome.end_time - outcome.start_time, 0.0)
        job._complete(
            status,
            result=outcome.result,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            exception=outcome.exception,
            start_time=outcome.start_time or None,
            end_time=outcome.end_time or None,
            ip_addr=link.host if link is not None else None,
        )
        self._finished(job, node)

    def job_abandoned(
        self, key: int, link: NodeLink | None, reason: str, node_id: str = ""
    ) -> None:
        job = self._jobs.pop(key, None)
        if job is None:
            return
        self._not_executing(key)
        node = self._nodes.get(link.node_id) if link is not None else None
        # The node it was sent to, started or not (dispy sets ip_addr at dispatch).
        ip_addr = link.host if link is not None else None
        if ip_addr is None and node_id:
            ip_addr = parse_address(node_id)[0]
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
        if self._journal_jobs and self._journal is not None and job._key is not None:
            self._journal.done(self._recovery_id, job._key, job)
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

    # -- listeners (monitors) ------------------------------------------------------

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

    # -- jobs ----------------------------------------------------------------------

    def submit(self, *args: Any, **kwargs: Any) -> DispyJob:
        """Run the computation with these arguments on some node; return its job.

        Raises `SerializationError` (naming the type) if the arguments cannot be
        pickled, and `ClusterError` if the cluster is closed.
        """
        return self._submit(None, None, args, kwargs)

    def submit_job_id(self, job_id: Any, *args: Any, **kwargs: Any) -> DispyJob:
        """Like `submit`, with ``job.id`` set to ``job_id``."""
        return self._submit(job_id, None, args, kwargs)

    def submit_node(self, node: Any, *args: Any, **kwargs: Any) -> DispyJob | None:
        """Like `submit`, but run on ``node`` (a `DispyNode`, address or name) only.

        Returns None (and logs why) if ``node`` is not a node of this cluster, as
        dispy does.
        """
        node_id = self._node_id(node)
        if node_id is None:
            logger.warning("submit_node: %r is not a node of this cluster", node)
            return None
        return self._submit(None, node_id, args, kwargs)

    def submit_job_id_node(
        self, job_id: Any, node: Any, *args: Any, **kwargs: Any
    ) -> DispyJob | None:
        """`submit_node` with ``job.id`` set to ``job_id``."""
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
        if self._closed:
            raise ClusterError("this cluster is closed: create a new JobCluster")
        job_deps = collect(
            kwargs.pop("dispy_job_depends", None) or [], "dispy_job_depends"
        )
        limits = _job_limits(kwargs, self._options)
        payload = (args, kwargs, job_deps.names) if job_deps.names else (args, kwargs)
        try:
            buffers = serialize.dumps(payload)
        except SerializationError as exc:
            raise SerializationError(_unpicklable_argument(args, kwargs, exc)) from exc
        size = sum(memoryview(b).nbytes for b in buffers)
        if size > self._max_job_size - 4096:
            raise SerializationError(
                f"the job's arguments take {size} bytes, over the nodes' message size "
                f"limit of {self._max_job_size}: start the nodes with a larger "
                "--max-message-size, or send the data as files"
            )
        job = DispyJob(job_id, args, kwargs)
        key = next(self._keys)
        job._key = key
        job._cluster = self  # for job.cancel() / job.future.cancel()
        self._jobs[key] = job
        if self._journal_jobs and self._journal is not None:
            self._journal.submitted(self._recovery_id, key, job)
        with self._done:
            self._outstanding += 1
            self.end_time = None
        if self._options.cluster_status is not None:
            self._notify_cluster(JobStatus.Created, None, copy.copy(job))
        self.job_counts["submitted"] += 1
        self._emit(JobStatus.Created, None, job)
        self._driver.enqueue(key, buffers, node_id, job_deps.files or None, limits)
        self._drain.trigger()
        return job

    def cancel(self, job: DispyJob) -> int:
        """Cancel a job: queued jobs end `Cancelled`, running ones `Terminated`.

        Returns 0, or -1 if the job had already finished.
        """
        if job.done() or job._key is None or job._key not in self._jobs:
            return -1
        self._runner.call_soon(self._cancel_on_loop, [job._key])
        return 0

    def _cancel_on_loop(
        self, keys: list[int], unstarted: bool = False, held: bool = False
    ) -> None:
        """Cancel jobs in one go, so that all their cancels leave together
        (``unstarted``, ``held``: see `Driver.cancel`)."""
        self._driver.drain()  # a job may still be waiting to be scheduled
        for key in keys:
            self._driver.cancel(key, unstarted, held)

    def _cancel_unstarted(self, jobs: list[DispyJob]) -> bool:
        """Cancel ``jobs`` unless they have started (`dispynb.futures.JobFuture`).

        Returns True if the cancels went to the I/O loop: each job then ends
        ``Cancelled`` or is reported started (or done). On the I/O thread itself,
        which cannot wait for nodes, only the jobs no node has yet are cancelled
        (at once) and False is returned.
        """
        keys = [
            job._key
            for job in jobs
            if job._key is not None and not job.done() and job._key in self._jobs
        ]
        if self._runner.in_loop_thread():
            self._cancel_on_loop(keys, unstarted=True, held=True)
            return False
        if keys:
            self._runner.call_soon(self._cancel_on_loop, keys, True)
        return True

    def send_file(self, path: str, node: Any, relay: bool = False) -> int:
        """Copy a file into the computation's directory on ``node`` (dispy's method).

        The file keeps its path relative to the current directory when it is below
        it, else its base name. Returns 0, or -1 (with the reason logged) if it could
        not be sent, e.g. over the node's maximum file size. ``relay`` is accepted
        for dispy compatibility.
        """
        node_id = self._node_id(node)
        if node_id is None:
            logger.warning("send_file: %r is not a node of this cluster", node)
            return -1
        try:
            ref = file_ref(path, "send_file")
        except DispynbError as exc:
            logger.warning("send_file: %s", exc)
            return -1
        error = self._runner.run_sync(self._driver.send_file, node_id, ref)
        if error:
            logger.warning("send_file: %s", error)
            return -1
        return 0

    # -- nodes (dispy's node-management methods) ---------------------------------

    def allocate_node(self, node: Any) -> int:
        """Use ``node`` (any node spec, or several) for this computation.

        A node not yet used is connected and set up; one taken out with
        `deallocate_node` gets jobs again. Returns 0, or -1 for a bad spec (logged).
        """
        try:
            specs = parse_node_specs(node)
        except ConfigurationError as exc:
            logger.warning("allocate_node: %s", exc)
            return -1
        if self._closed:
            logger.warning("allocate_node: the cluster is closed")
            return -1
        wildcards = [spec for spec in specs if is_wildcard(spec)]
        if wildcards:
            # Nodes released by close_node that these specs match may come back.
            self._released = {
                node_id
                for node_id in self._released
                if not any(
                    spec.matches(parse_address(node_id)[0]) for spec in wildcards
                )
            }
            try:
                self._runner.run_sync(self._discover, wildcards)
            except (OSError, DispynbError) as exc:
                logger.warning("allocate_node: cannot discover nodes: %s", exc)
                return -1
        for spec in specs:
            if is_wildcard(spec):
                continue
            port = spec.port or NODE_PORT
            node_id = format_address(spec.host, port)
            self._released.discard(node_id)
            if node_id in self._driver.nodes:
                full = self._driver.nodes[node_id].cpus
                self._on_loop(self._driver.set_cpus, node_id, full)
            else:
                self._on_loop(
                    self._driver.add_node, spec.host, port, self._allocator(spec)
                )
        return 0

    def discover_nodes(self, nodes: Any) -> int:
        """Look for ``nodes``: wildcards by broadcast, explicit hosts by connecting."""
        return self.allocate_node(nodes)

    async def _discover(self, specs: list[NodeAllocate]) -> None:
        """Look for nodes matching wildcard ``specs`` (on the I/O loop)."""
        if self._finder is None:
            opts = self._options
            host = opts.host[0] if isinstance(opts.host, list) else opts.host
            finder = NodeFinder(
                list(specs),
                self._use_found_node,
                host=host,
                multicast=opts.ipv4_udp_multicast,
                ping_interval=opts.ping_interval,
            )
            await finder.start()
            self._finder = finder
            self._driver.discovering = True
        else:
            self._finder.add(specs)

    def deallocate_node(self, node: Any) -> int:
        """Send ``node`` no more jobs (its computation stays set up); 0 or -1."""
        node_id = self._node_id(node)
        if node_id is None:
            return -1
        return 0 if self._on_loop(self._driver.set_cpus, node_id, 0) >= 0 else -1

    def set_node_cpus(self, node: Any, cpus: int) -> int:
        """Use ``cpus`` CPUs of ``node`` (negative: all but that many).

        Returns the CPUs now used, or -1 for an unknown node. A node never gets more
        jobs at once than it set up workers for.
        """
        node_id = self._node_id(node)
        if node_id is None:
            return -1
        if cpus < 0:
            cpus = self._driver.nodes[node_id].cpus + cpus
        used = int(self._on_loop(self._driver.set_cpus, node_id, cpus))
        node = self._nodes.get(node_id)
        if node is not None and used >= 0:
            node.cpus = node.avail_cpus = used
            self._emit(DispyNode.AvailInfo, node, None)
        return used

    def close_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Close the computation on ``node`` (running its cleanup) and release it.

        Its running jobs finish first (``terminate_pending`` terminates them); jobs
        submitted to it with `submit_node` that have not started are cancelled. The
        node is not set up again for this cluster, not even when discovery finds it
        again, until `allocate_node` names it (or a pattern it matches). Returns 0,
        or -1 if ``node`` is not a node of this cluster.
        """
        node_id = self._node_id(node)
        if node_id is None:
            return -1
        self._released.add(node_id)
        if not self._on_loop(self._driver.close_node, node_id, terminate_pending):
            self._released.discard(node_id)
            return -1
        return 0

    def resetup_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Close the computation on ``node`` and set it up again.

        `NodeAllocate.allocate` runs again, so new per-node ``depends`` and
        ``setup_args`` take effect (dispy's way to replace in-memory data).
        """
        node_id = self._node_id(node)
        if node_id is None:
            return -1
        ok = self._on_loop(self._driver.resetup_node, node_id, terminate_pending)
        return 0 if ok else -1

    def node_jobs(self, node: Any, from_node: bool = False) -> list[DispyJob]:
        """The jobs of this cluster running on ``node`` now."""
        node_id = self._node_id(node)
        if node_id is None:
            return []
        keys = self._on_loop(self._driver.running_keys, node_id)
        return [job for key in keys if (job := self._jobs.get(key)) is not None]

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)`` on the I/O thread and return its result."""

        async def call() -> Any:
            return fn(*args)

        return self._runner.run_sync(call)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job is done; False if ``timeout`` passed first."""
        with self._done:
            done = self._done.wait_for(lambda: self._outstanding == 0, timeout)
        if done and not self._callbacks.in_dispatcher_thread():
            self._callbacks.flush(timeout)
        return done

    __call__ = wait

    # -- dispy's attributes ----------------------------------------------------------

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

    # -- status --------------------------------------------------------------------

    def status(self) -> ClusterStatus:
        """The cluster's nodes and the number of jobs not yet done."""
        return ClusterStatus(list(self._nodes.values()), self._outstanding)

    def workload(self) -> Workload:
        """Jobs waiting for a node and each node's load (launchers' ``adapt`` reads
        it to grow and shrink the nodes; `close_node` drains one)."""
        if self._closed:
            return Workload(0, {})
        workload: Workload = self._on_loop(self._workload)
        return workload

    def _workload(self) -> Workload:
        state = self._driver.state
        nodes = {}
        for info in state.nodes:
            node = self._nodes.get(info.node)
            done = node.jobs_done if node is not None else 0
            nodes[info.node] = NodeWork(info.cpus, info.running, done)
        return Workload(max(0, self._outstanding - state.running_count), nodes)

    def print_status(self, wall_time: float | None = None) -> None:
        """Print dispy's per-node table of jobs, times and traffic."""
        self._update_traffic()
        if wall_time is None:
            wall_time = time.time() - self._start_time
        print(format_status(list(self._nodes.values()), wall_time, self._outstanding))

    stats = print_status

    def _update_traffic(self) -> None:
        for node_id, link in list(self._driver.nodes.items()):
            node = self._nodes.get(node_id)
            if node is not None and link.conn is not None:
                node.tx, node.rx = link.conn.bytes_sent, link.conn.bytes_received

    # -- shutdown ------------------------------------------------------------------

    def close(self, timeout: float | None = None, terminate: bool = False) -> bool:
        """Wait for the jobs (or cancel them: ``terminate``), then release the nodes.

        Returns True if every job was done before the computation was closed.
        """
        if self._closed:
            return True
        if terminate:
            keys = [key for key, job in list(self._jobs.items()) if not job.done()]
            self._runner.call_soon(self._cancel_on_loop, keys)
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
        _live.pop(self._driver.config.comp_id, None)
        if self._launcher is not None:
            self._launcher.unsubscribe(self._use_registered_node)
        try:
            self._update_traffic()
            if self._finder is not None:
                self._on_loop(self._finder.close)
            self._runner.run_sync(self._driver.close, terminate)
        except (DispynbError, RuntimeError) as exc:
            logger.warning("closing the cluster: %s", exc)
        finally:
            self._callbacks.close()
            self._runner.release()
            if self._journal is not None and not self._journal_jobs:
                release_default_journal(
                    self._journal, self._recovery_id, clean=not self._jobs
                )
            elif self._journal is not None:
                # A clean close leaves nothing to recover (dispy removes it too).
                self._journal.close(remove=not self._jobs)

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


def _avail_info(avail: list[float]) -> DispyNodeAvailInfo | None:
    if len(avail) != 4:
        return None
    cpu, memory, disk, swap = avail
    return DispyNodeAvailInfo(cpu, int(memory), int(disk), swap)


def _read_program(path: str) -> dict[str, Any]:
    """The program file to ship, for a program computation."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read program {path!r}: {exc}") from exc
    return {"name": os.path.basename(path), "data": data}


#: Stands for a magic keyword that was not given (None means "no limit").
_UNSET: Any = object()


def _job_limits(
    kwargs: dict[str, Any], opts: ClusterOptions
) -> tuple[float | None, int | None] | None:
    """Pop ``dispy_job_timeout``/``dispy_job_mem_limit``; the job's limits, or None.

    Each falls back to the cluster's ``job_timeout``/``mem_limit``; an explicit None
    lifts the cluster's limit for this job.
    """
    timeout = kwargs.pop("dispy_job_timeout", _UNSET)
    mem = kwargs.pop("dispy_job_mem_limit", _UNSET)
    timeout = (
        opts.job_timeout
        if timeout is _UNSET
        else check_job_timeout(timeout, "dispy_job_timeout")
    )
    mem = (
        opts.mem_limit if mem is _UNSET else check_mem_limit(mem, "dispy_job_mem_limit")
    )
    if timeout is None and mem is None:
        return None
    assert not isinstance(mem, str)  # ClusterOptions normalised it to bytes
    return timeout, mem


def _unpicklable_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: SerializationError
) -> str:
    """Name the argument that cannot be pickled (the error only names the tuple)."""
    named = [(f"argument {i + 1}", value) for i, value in enumerate(args)]
    named += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for name, value in named:
        try:
            serialize.dumps(value)
        except SerializationError as exc:
            return f"job {name} cannot be sent to a node: {exc}"
    return f"job arguments cannot be sent to a node: {error}"


def _result_cap(opts: ClusterOptions) -> int:
    """Bytes a result may pickle to: ``max_result_size``, within what a message from
    a node may carry here besides the job's output (4 bytes a character, 2 streams)."""
    output = opts.max_output_size
    room = (
        opts.max_message_size
        - (1 << 20)
        - 8 * (output if isinstance(output, int) else 0)
    )
    cap = opts.max_result_size
    return max(room, 0) if not isinstance(cap, int) else min(cap, max(room, 0))


def _client_name() -> str:
    return f"{socket.gethostname()}:{sys.argv[0].rsplit('/', 1)[-1] or 'python'}"


def _set_log_level(level: int) -> None:
    root = logging.getLogger("dispynb")
    root.setLevel(level)
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
        )
        root.addHandler(handler)


def _default_recovery_applies(nodes: Any) -> bool:
    """Whether a cluster given no ``recover_file`` writes dispy's default one.

    Scripts do, as dispy's clients. Not in notebooks and interactive sessions (no
    ``_dispy_*`` files among the notebooks; a restarted kernel frees its nodes'
    CPUs instead of leaving its jobs running for an hour), nor on a `LocalCluster`
    (its nodes end with this process). ``recover_file=...`` asks for it anywhere.
    """
    if getattr(nodes, "secret", None) is not None:  # a LocalCluster
        return False
    ipython = sys.modules.get("IPython")
    in_ipython = ipython is not None and ipython.get_ipython() is not None
    return not (in_ipython or hasattr(sys, "ps1"))


_exit_hook = threading.Lock()
_exit_hooked = False


def _close_at_exit_once() -> None:
    """Close, at interpreter exit, the clusters a program did not close (as dispy)."""
    global _exit_hooked
    with _exit_hook:
        if not _exit_hooked:
            atexit.register(_close_at_exit)
            _exit_hooked = True


def _close_at_exit() -> None:
    # Jobs still pending have nobody left to read them: terminate them (dispy waited
    # for them), release the nodes and remove the default recovery file. Bounded:
    # an exit never hangs on a node that does not answer.
    for cluster in reversed(live_clusters()):
        try:
            cluster.close(timeout=EXIT_WAIT, terminate=True)
        except Exception:
            logger.warning("closing cluster %r at exit failed", cluster.name)


def live_clusters() -> list[JobCluster]:
    """The clusters of this process that are not closed, oldest first."""
    clusters = [ref() for _, ref in sorted(_live.items())]
    return [c for c in clusters if c is not None and not c._closed]


__all__ = [
    "ClusterStatus",
    "JobCluster",
    "Listener",
    "NoNodesError",
    "format_status",
    "live_clusters",
]
