"""dispynb's own engine: node servers (``dispynb-node``) reached over TCP.

`NodeEngine` is the default engine of `JobCluster` (``engine=None``). Its backend,
`NodesBackend`, binds a cluster to the node-server machinery: the `Driver` (the
scheduler state machine and the connections), the `NodeFinder` (discovery), the
secret and TLS, the computation bundle shipped to each node, argument pickling and
the nodes' message size limit. It turns the driver's reports, made in terms of
`NodeLink`, into the seam's `JobEvents` in terms of `NodeInfo`
(`dispynb.backends.base`). Everything here runs on the cluster's I/O loop, except
the methods the façade calls from user threads, which hop onto it.

Its parts: `dispynb.backends._nodereports` (the driver's reports, passed on),
`dispynb.backends._nodeturns` (the user's changes of its nodes) and
`dispynb.backends._nodesettings` (what it derives from the options and checks of
each node).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

from dispynb._loop import Coalescer
from dispynb.backends import base
from dispynb.backends._nodereports import NodeReports
from dispynb.backends._nodesettings import (
    PYTHON,
    check_python,
    client_name,
    compiled_code,
    configured_port,
    result_cap,
)
from dispynb.backends._nodeturns import NodeTurns
from dispynb.backends.base import ClusterConfig, JobEvents, NodeInfo
from dispynb.backends.finder import NodeFinder
from dispynb.captures import check_shippable
from dispynb.defaults import MAX_MESSAGE_SIZE
from dispynb.depends import FileRef, collect
from dispynb.errors import (
    AuthenticationError,
    ConfigurationError,
    DispynbError,
    ProtocolError,
    SerializationError,
    SetupError,
    TransportError,
)
from dispynb.node import NodeAllocate, is_wildcard, parse_node_specs
from dispynb.programs import read_program
from dispynb.protocol import serialize
from dispynb.protocol.framing import Buffer, buffers_size
from dispynb.protocol.messages import Welcome
from dispynb.protocol.records import ComputationBundle, ProgramFile
from dispynb.scheduler.driver import Allocator, Driver, DriverConfig
from dispynb.transport.addressing import format_address
from dispynb.transport.tls import client_context

logger = logging.getLogger(__name__)

_comp_ids = itertools.count(1)

#: Seconds nodes keep the results of a computation whose client (with a
#: ``recover_file``) went away, for `recover_jobs`.
RECOVERY_KEEP = 3600.0

#: Seconds `JobCluster()` waits for a first discovered node (nodes found later are
#: used as they come).
DISCOVERY_WAIT = 2.0

#: Seconds `JobCluster()` waits for a first node to be set up. Connection and
#: authentication errors surface within this time; a longer ``setup`` keeps running
#: after the constructor returns, and jobs wait for it.
STARTUP_WAIT = 15.0

#: Bytes of a job message besides its arguments (header, MAC, framing).
_JOB_OVERHEAD = 4096


class NodeEngine:
    """dispynb's node servers: the nodes named by ``nodes=`` (specs, a
    `LocalCluster`, a launcher), or found by discovery. Every feature."""

    name = "nodes"
    features: frozenset[str] = base.ALL_FEATURES

    def open(self, events: JobEvents, config: ClusterConfig) -> NodesBackend:
        """Connect to the nodes and set the computation up; see `Engine.open`."""
        return base.started(NodesBackend(events, config))

    def __repr__(self) -> str:
        return "NodeEngine()"


class NodesBackend(NodeReports, NodeTurns):
    """One cluster's computation on node servers (a `Backend`); the driver's reports
    are `NodeReports`', the user's changes of its nodes (`allocate_node`,
    `close_node`...) `NodeTurns`'."""

    #: Its results arrive on the loop's sockets: a thread waiting for one may read
    #: it in the loop's place (`dispynb._inplace`).
    reads_in_place = True

    def __init__(
        self,
        events: JobEvents,
        config: ClusterConfig,
        specs: list[NodeAllocate] | None = None,
    ) -> None:
        """``specs``: the nodes to use instead of ``config.options.nodes`` (an
        engine that knows where its nodes are, as the scheduler's does)."""
        self._events = events
        self._config = config
        self._runner = config.runner
        opts = self._options = config.options
        # The port of nodes named without one: dispy's node_port (up to 4.10), or
        # its dispy_port, which pairs with the node's -p (or dispy.config's).
        self._node_port = opts.node_port or opts.dispy_port or configured_port()
        self._program: ProgramFile | None = None
        if isinstance(opts.computation, str):
            self._program = read_program(opts.computation)
        nodes = opts.nodes
        # As in dispy, no nodes means: discover them on the local networks.
        self._specs = specs or parse_node_specs(nodes) or parse_node_specs("*")
        serialize.ship_by_value(
            opts.computation, opts.setup, opts.cleanup, *opts.depends
        )
        # Once here, naming what cannot travel, rather than per node as it connects
        # (where it read as that node's fault).
        check_shippable(opts.computation, "computation")
        check_shippable(opts.setup, "setup function")
        check_shippable(opts.cleanup, "cleanup function")
        tls = bool(opts.certfile or opts.cafile) or bool(getattr(nodes, "tls", False))
        # Ready nodes as the façade knows them, by node id.
        self._info: dict[str, NodeInfo] = {}
        self._malformed_avail: set[str] = set()  # nodes warned of (`_reported_avail`)
        self._finder: NodeFinder | None = None
        self._launcher: Any = None  # a launcher (dispynb.deploy) it subscribed to
        self._closed = False
        self._max_job_size = MAX_MESSAGE_SIZE
        self._startup: asyncio.Future[None] | None = None
        self._node_errors: list[DispynbError] = []
        #: Job key -> the node that reported it started (loop thread only): the
        #: jobs running there, of those sent to it (`running_jobs`).
        self._started: dict[int, str] = {}
        self.driver = Driver(
            DriverConfig(
                comp_id=next(_comp_ids),
                name=config.name,
                secret=opts.secret,
                max_message_size=opts.max_message_size,
                ssl_context=client_context(opts.certfile, opts.keyfile, opts.cafile)
                if tls
                else None,
                dest_path=opts.dest_path,
                cleanup=bool(opts.cleanup),
                reentrant=opts.reentrant,
                max_attempts=opts.max_attempts,
                pulse_interval=opts.pulse_interval,
                ping_interval=opts.ping_interval,
                setup_timeout=opts.setup_timeout,
                recovery_id=config.recovery_id,
                keep_results=RECOVERY_KEEP if config.recovery_id else 0.0,
                keep_sent=config.journal_jobs,
                client_name=client_name(),
                max_output=opts.max_output_size,  # type: ignore[arg-type]
                max_result=result_cap(opts),
                max_pids=opts.max_pids,
                fresh_process=opts.fresh_process,
                # Nodes (a scheduler's too) on another version refuse compiled code.
                python=PYTHON if compiled_code(opts, config.depends.names) else "",
                result_types=None
                if opts.result_types is None
                else serialize.AllowList(opts.result_types),
                node_exited=getattr(nodes, "exit_reason", None),
                nodes_expected=getattr(nodes, "expecting_nodes", None),
            ),
            self,
        )
        # Node ids released by close_node: discovery does not bring them back, and
        # while there is one, queued jobs wait for allocate_node (the driver's set).
        self._released = self.driver.released
        self._drain = Coalescer(self._runner, self.driver.drain)

    # -- start-up ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the nodes; return once one is ready (or a short wait passed)."""
        try:
            self._runner.run_sync(self._start)
        except (AuthenticationError, TransportError, ProtocolError, SetupError) as exc:
            # The message names the node, what failed and the remedy (a failed
            # setup: with the node's traceback, `JobCluster` shows it); the I/O
            # thread's frames and the chain of wrapped errors would only bury it.
            raise exc.with_traceback(None) from None
        nodes = self._options.nodes
        subscribe = getattr(nodes, "subscribe", None)
        if callable(subscribe):
            # A launcher (`dispynb.deploy.NodeLauncher`): nodes that register later
            # are used like discovered ones (queued jobs wait for them while the
            # launcher expects some: `DriverConfig.nodes_expected`).
            if self.driver.config.nodes_expected is None:
                self._on_loop(setattr, self.driver, "discovering", True)
            subscribe(self._use_registered_node, cluster=self._config.cluster)
            self._launcher = nodes

    async def _start(self) -> None:
        # What makes JobCluster() fail is said once, by its exception; the nodes
        # that failed while others are used are warned about (`node_failed`).
        self.driver.hold_failure_warnings()
        try:
            await self._connect_nodes()
        except BaseException as exc:
            said = self._node_errors if exc in self._node_errors else ()
            self.driver.release_failure_warnings(said)
            raise
        self.driver.release_failure_warnings()

    async def _connect_nodes(self) -> None:
        self._startup = asyncio.get_running_loop().create_future()
        explicit = [spec for spec in self._specs if not is_wildcard(spec)]
        for spec in explicit:
            self.driver.add_node(
                spec.host,
                spec.port or self._node_port,
                self._allocator(spec, spec.port or self._node_port),
            )
        wildcards = [spec for spec in self._specs if is_wildcard(spec)]
        wait = STARTUP_WAIT
        if wildcards:
            try:
                await self._discover(wildcards, ready=lambda: bool(self._info))
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

    async def _discover(
        self, specs: list[NodeAllocate], ready: Callable[[], bool] | None = None
    ) -> None:
        """Look for nodes matching wildcard ``specs`` (on the I/O loop)."""
        if self._finder is not None:
            self._finder.add(specs)
            return
        opts = self._options
        host = opts.host[0] if isinstance(opts.host, list) else opts.host
        finder = NodeFinder(
            list(specs),
            self._use_found_node,
            host=host,
            multicast=opts.ipv4_udp_multicast,
            ping_interval=opts.ping_interval,
            ready=ready,
            local=not (opts.secret or opts.certfile),
        )
        discovering, self.driver.discovering = self.driver.discovering, True
        try:
            await finder.start()  # nodes may appear at any time from now on
        except BaseException:
            finder.close()
            self.driver.discovering = discovering
            raise
        self._finder = finder

    def _use_registered_node(self, ip: str, port: int) -> None:
        """A launched node registered: connect to it (on the I/O loop)."""
        self._use_found_node(ip, port, parse_node_specs(format_address(ip, port))[0])

    def _use_found_node(self, ip: str, port: int, spec: NodeAllocate) -> None:
        """A discovered node matched ``spec``: connect to it (on the I/O loop)."""
        node_id = format_address(ip, port)
        if (
            node_id not in self.driver.nodes
            and node_id not in self._released
            and not self._closed
        ):
            self.driver.add_node(ip, port, self._allocator(spec, port))

    def _allocations(
        self, spec: NodeAllocate, port: int, ip: str, name: str
    ) -> list[NodeAllocate]:
        """The node allocations asked, in turn, how many CPUs of the node at
        ``ip:port`` to use, as dispy asks its cluster's: those naming a host before
        patterns (``spec``, which found the node, first among its kind), each in
        the order of ``nodes``; the first that gives CPUs is the node's."""
        fits = [
            other
            for other in self._specs
            if other is not spec
            and other.port in (None, port)
            and other.matches(ip, name)
        ]
        asked = [spec, *fits]
        return [a for a in asked if not is_wildcard(a)] + [
            a for a in asked if is_wildcard(a)
        ]

    def _allocator(self, spec: NodeAllocate, port: int) -> Allocator:
        opts = self._options
        deps = self._config.depends
        compiled = compiled_code(opts, deps.names)

        def allocate(
            welcome: Welcome, peer_ip: str
        ) -> tuple[int, list[Buffer], list[FileRef]]:
            check_python(welcome, peer_ip, compiled)
            chosen = spec
            try:
                avail = self._reported_avail(peer_ip, welcome.avail)
                cpus = 0
                for asked in self._allocations(spec, port, peer_ip, welcome.name):
                    cpus = asked.allocate(
                        self._config.cluster,
                        peer_ip,
                        welcome.name,
                        welcome.cpus,
                        avail_info=avail,
                        platform=welcome.platform,
                    )
                    if cpus and cpus > 0:  # else dispy asks the next one
                        chosen = asked  # its depends and setup_args apply
                        break
                # allocate() may set per-node depends and setup_args (dispy examples do)
                node_deps = collect(chosen.depends, "NodeAllocate.depends")
                if node_deps.names:  # compiled code of this node's own
                    check_python(welcome, peer_ip, compiled_code(opts, node_deps.names))
            except DispynbError:
                raise
            except Exception as exc:
                raise ConfigurationError(
                    f"NodeAllocate.allocate raised {exc!r}"
                ) from exc
            self._max_job_size = min(self._max_job_size, welcome.max_message_size)
            bundle: ComputationBundle = {
                "func": opts.computation if callable(opts.computation) else None,
                "program": self._program,
                "setup": opts.setup,
                "cleanup": opts.cleanup if callable(opts.cleanup) else None,
                "setup_args": tuple(chosen.setup_args),
                "names": {**deps.names, **node_deps.names},
            }
            files = deps.files + node_deps.files
            return int(cpus or 0), serialize.dumps(bundle), files

        return allocate

    # -- the Backend (called by the façade) --------------------------------------------

    def prepare(self, job: base.JobRequest) -> None:
        """Pickle the job's arguments and check their size (any thread)."""
        args, kwargs, deps = job.args, job.kwargs, job.depends
        names = deps.names if deps is not None else None
        payload = (args, kwargs, names) if names else (args, kwargs)
        try:
            buffers = serialize.dumps(payload)
        except SerializationError as exc:
            # The message names the argument and the pickler's error; the chain
            # would only repeat it about the tuple of every argument.
            raise SerializationError(
                serialize.unsendable_arguments(args, kwargs, exc, "a node")
            ) from None
        size = buffers_size(buffers)
        if size > self._max_job_size - _JOB_OVERHEAD:
            raise SerializationError(
                f"the job's arguments take {size} bytes, over the nodes' message size "
                f"limit of {self._max_job_size}: start the nodes with a larger "
                "--max-message-size, or send the data as files"
            )
        job.payload = buffers

    def submit(self, job: base.JobRequest) -> None:
        """Queue a prepared job; the loop schedules it soon (any thread)."""
        deps = job.depends
        limits = (
            None
            if job.timeout is None and job.mem_limit is None
            else (job.timeout, job.mem_limit)
        )
        # Not dead: depends of Python objects only (a function, a module) have no
        # files ([]), and such a job may still be sent in the loop's place.
        files = deps.files if deps is not None and deps.files else None
        node, pin = self._destination(job)
        self.driver.enqueue(job.key, job.payload, node, files, limits, pin)
        # With the loop idle, this thread sends the job itself: the loop thread is
        # then woken once per job (by its result), not also to send it.
        if files is None and self._runner.enter():
            # All is settled before `leave`, which may raise a Ctrl-C it held.
            try:
                if not self.driver.drain_direct():
                    self._drain.trigger()
                elif self.driver.direct_wake:
                    self.driver.direct_wake = False
                    self._runner.call_soon(_nothing)
            finally:
                self._runner.leave()
            return
        self._drain.trigger()

    def _destination(self, job: base.JobRequest) -> tuple[str | None, str | None]:
        """The node ``job`` goes to (None: any) and the node behind it that must
        run it (a shared scheduler's, `SchedulerBackend`; None here)."""
        return job.node_id, None

    def cancel(
        self, keys: list[int], unstarted: bool = False, held: bool = False
    ) -> None:
        """Cancel jobs in one go on the loop, so that their cancels leave together."""
        if held and self._runner.in_loop_thread():
            self._cancel_on_loop(keys, unstarted, held)
        else:
            self._runner.call_soon(self._cancel_on_loop, keys, unstarted, held)

    def _cancel_on_loop(self, keys: list[int], unstarted: bool, held: bool) -> None:
        self.driver.drain()  # a job may still be waiting to be scheduled
        # Latest submitted first: those still wait on their nodes while the earlier
        # ones run. A node may read each cancel apart; a CPU freed by a job it stops
        # would start a waiting job that was to be cancelled next (it then ended
        # terminated, not cancelled). The queued ones are dropped in one go: a Stop
        # of 200,000 jobs is one pass, not 200,000.
        self.driver.cancel_many(sorted(keys, reverse=True), unstarted, held)

    def node_load(self) -> dict[str, tuple[int, int]]:
        return dict(self._on_loop(self._node_load))

    def _node_load(self) -> dict[str, tuple[int, int]]:
        return {
            info.node: (info.cpus, info.running) for info in self.driver.state.nodes
        }

    def send_file(self, node_id: str, ref: FileRef) -> str:
        return str(self._runner.run_sync(self.driver.send_file, node_id, ref))

    def running_jobs(self, node_id: str) -> list[int]:
        """The jobs running on the node, as dispy's ``node_jobs`` lists them: those
        it reported started, not those sent ahead to wait in its queue."""
        return list(self._on_loop(self._running_keys, node_id))

    def _running_keys(self, node_id: str) -> list[int]:
        started = self._started
        return [
            key
            for key in self.driver.running_keys(node_id)
            if started.get(key) == node_id
        ]

    def traffic(self, node_id: str) -> tuple[int, int]:
        link = self.driver.nodes.get(node_id)
        conn = link.conn if link is not None else None
        return (conn.bytes_sent, conn.bytes_received) if conn is not None else (0, 0)

    def close(self, terminate: bool) -> None:
        """Close the computation on every node, then the connections."""
        if self._closed:
            return
        self._closed = True
        if self._launcher is not None:
            self._launcher.unsubscribe(self._use_registered_node)
        if self._finder is not None:
            self._on_loop(self._finder.close)
        self._runner.run_sync(self.driver.close, terminate)

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)`` on the I/O thread and return its result."""

        async def call() -> Any:
            return fn(*args)

        return self._runner.run_sync(call)


def _nothing() -> None:
    """A callback that only wakes the loop (`NodesBackend.submit`)."""


__all__ = ["DISCOVERY_WAIT", "RECOVERY_KEEP", "STARTUP_WAIT", "NodeEngine"]
