"""`Driver`: the client's async glue between `SchedulerState` and node connections.

It runs on the client's I/O loop. It connects to nodes, sets the computation up on
each, feeds events to the pure `SchedulerState` and carries out its instructions:
job batches go out as one message per node per loop turn, results come back in
batches. What happens to user-visible jobs is reported through `JobEvents`, so this
layer knows job keys, not `DispyJob` objects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import itertools
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dispynb import config as dispy_config
from dispynb.defaults import CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT
from dispynb.depends import FileRef
from dispynb.errors import ClusterError, DispynbError, SerializationError, SetupError
from dispynb.protocol import serialize, shm
from dispynb.protocol.framing import Buffer
from dispynb.protocol.messages import (
    CRASHED,
    FINISHED,
    RETURNED,
    ComputationClose,
    ComputationClosed,
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    Error,
    FileFromNode,
    FilePlace,
    FilePlaced,
    FilePut,
    FilesMissing,
    JobCancel,
    JobProvisional,
    JobResults,
    JobSubmit,
    Message,
    NodeStatus,
    Ping,
    ResultChunk,
    Welcome,
)
from dispynb.protocol.records import ResultEntry
from dispynb.scheduler.events import (
    AbandonJob,
    AcceptResult,
    CancelQueued,
    CancelRequested,
    CancelRunning,
    Instruction,
    JobFinished,
    JobReturned,
    JobSubmitted,
    NodeJoined,
    NodeLeft,
    ResubmitJob,
    SendJobs,
)
from dispynb.scheduler.state import SchedulerState, attempts_spent
from dispynb.transport.addressing import format_address
from dispynb.transport.connection import Connection, describe_error
from dispynb.transport.connector import connect

logger = logging.getLogger(__name__)

#: A job batch is cut once its arguments pass this size (keeps messages moderate).
BATCH_BYTES = 8 * 1024 * 1024

#: Seconds between pulses when the cluster sets no ``pulse_interval``.
DEFAULT_PULSE = 1.0

#: A node is declared dead after this many pulses without a word from it.
DEAD_AFTER = 3

#: Reconnection to a lost node: first delay, longest delay, and for how long (s).
RECONNECT_DELAY = 0.5
RECONNECT_DELAY_MAX = 5.0
RECONNECT_FOR = 60.0

#: Seconds a node gets to acknowledge closing the computation.
CLOSE_TIMEOUT = 30.0


@dataclass(slots=True, eq=False)
class NodeLink:
    """A node as the driver sees it: its connection and counters."""

    node_id: str
    host: str
    port: int
    conn: Connection | None = None
    welcome: Welcome | None = None
    cpus: int = 0
    ready: bool = False
    setting_up: bool = False
    jobs_done: int = 0
    cpu_time: float = 0.0
    closed: asyncio.Future[None] | None = None
    sent: set[str] = field(default_factory=set)  # digests of files it has
    allocate: Allocator | None = None
    peer_ip: str = ""
    resetting: bool = False
    last_seen: float = 0.0  # loop time of the last message from it
    reads_seen: int = 0  # its connection's reads when the watchdog last looked
    leaving: bool = False  # it handed jobs back: it shuts down
    releasing: bool = False  # close_node: once closed it leaves, not to come back
    # Files to send (read off the loop) and the messages that must follow them,
    # in wire order; `pumping` while `Driver._pump` works through them.
    outbox: collections.deque[FileRef | tuple[Message, list[Buffer]]] = field(
        default_factory=collections.deque
    )
    pumping: bool = False
    #: On this machine and our user: large arguments go through shared memory.
    shared_memory: bool = False


#: ``allocate(welcome, peer_ip) -> (cpus, bundle, files)`` (see `Driver.add_node`).
Allocator = Callable[[Welcome, str], tuple[int, list[Buffer], list[FileRef]]]


@dataclass(frozen=True, slots=True)
class _Stop:
    """A message handler's answer that ends reading the node: why (None: the node
    failed its setup and was dropped already)."""

    reason: str | None


#: A node message handler, ``handler(link, message, buffers)``; returns `_Stop` to
#: stop reading the node, None to go on.
_Handler = Callable[[NodeLink, Any, list[memoryview]], "_Stop | None"]


@dataclass(slots=True)
class Outcome:
    """What a node reported for one job."""

    outcome: str
    result: Any
    stdout: str | bytes  # bytes from a program computation
    stderr: str | bytes
    exception: str | None
    start_time: float
    end_time: float


class JobEvents(Protocol):
    """What the driver tells the user-facing cluster."""

    def jobs_sent(self, keys: list[int], node: NodeLink) -> None:
        """Jobs were sent to ``node``; they may wait there for a free worker."""

    def job_running(self, key: int, node: NodeLink, start_time: float) -> None:
        """A job started executing on ``node`` at ``start_time`` (the node's clock)."""

    def job_done(self, key: int, node: NodeLink | None, outcome: Outcome) -> None:
        """A job ended on ``node`` (None: it never ran)."""

    def job_provisional(self, key: int, node: NodeLink, result: Any) -> None:
        """A running job sent a provisional result."""

    def job_file(
        self, key: int, node: NodeLink, path: str, data: list[memoryview]
    ) -> None:
        """A running job sent a file (``path`` is relative and checked)."""

    def job_abandoned(
        self, key: int, node: NodeLink | None, reason: str, node_id: str = ""
    ) -> None:
        """A job cannot run anymore (its node, ``node_id``, is gone)."""

    def job_cancelled(self, key: int) -> None:
        """A queued job was cancelled before it ran."""

    def job_requeued(self, key: int) -> None:
        """A job's node was lost; the job waits to run elsewhere (reentrant)."""

    def node_ready(self, node: NodeLink) -> None:
        """The computation is set up on ``node``."""

    def node_failed(self, node: NodeLink, error: DispynbError) -> None:
        """``node`` could not be used (connect, auth or setup failed)."""

    def node_closed(self, node: NodeLink, reason: str) -> None:
        """``node`` left the cluster (for a while only if ``node.resetting``: it is
        set up again, `resetup_node`)."""

    def node_status(self, node: NodeLink, avail: list[float]) -> None:
        """``node`` reported the resources it has available."""


@dataclass(slots=True)
class _Pending:
    buffers: list[Buffer]
    node: str | None = None
    files: list[FileRef] | None = None
    limits: tuple[float | None, int | None] | None = None  # (timeout s, mem bytes)


@dataclass(kw_only=True)
class DriverConfig:
    """Connection settings shared by every node of a cluster."""

    comp_id: int
    name: str
    secret: bytes | None = field(repr=False)
    max_message_size: int
    ssl_context: ssl.SSLContext | None = None
    dest_path: str | None = None
    cleanup: bool = True
    reentrant: bool = False
    max_attempts: int = 3
    client_name: str = ""
    pulse_interval: float | None = None
    setup_timeout: float | None = None
    recovery_id: str | None = None
    keep_results: float = 0.0
    keep_sent: bool = True
    max_output: int | None = None
    max_result: int | None = None
    max_pids: int | None = None
    fresh_process: bool = False
    #: Restricted unpickling of results (``result_types``); None: plain pickle.
    result_types: serialize.AllowList | None = None


class Driver:
    """Schedules one computation's jobs over its nodes (runs on the I/O loop)."""

    def __init__(self, config: DriverConfig, events: JobEvents) -> None:
        self.config = config
        self.events = events
        self.state = SchedulerState(
            reentrant=config.reentrant, max_attempts=config.max_attempts
        )
        self.nodes: dict[str, NodeLink] = {}
        self._jobs: dict[int, _Pending] = {}
        self._incoming: collections.deque[
            tuple[
                int,
                list[Buffer],
                str | None,
                list[FileRef] | None,
                tuple[float | None, int | None] | None,
            ]
        ] = collections.deque()
        self._files: dict[str, FileRef] = {}  # by digest: what nodes may ask for
        self._placements: dict[int, asyncio.Future[str]] = {}
        # Large results arriving in chunks: (node, key, attempt) -> index ->
        # [bytearray or BytesIO, bytes received, size]; None once refused.
        self._streams: dict[tuple[str, int, int], dict[int, list[Any]] | None] = {}
        self._requests = itertools.count(1)
        # Shared memory objects holding jobs' arguments: key -> attempt -> name,
        # unlinked when the job ends (the worker unlinks them as it opens them).
        self._segments: dict[int, dict[int, str]] = {}
        self._connecting = 0
        self._reconnecting = 0
        self.discovering = False  # nodes may still appear: queued jobs wait for them
        self._watchdog: asyncio.Task[None] | None = None
        self.pulse = config.pulse_interval or DEFAULT_PULSE
        self.last_error: DispynbError | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Node messages by type (the node server routes client messages alike).
        self._routes: dict[type[Message], _Handler] = {
            JobResults: self._on_results,
            JobProvisional: self._on_provisional,
            NodeStatus: self._on_status,
            FilesMissing: self._on_files_missing,
            ResultChunk: self._on_chunk,
            FileFromNode: self._on_file,
            FilePlaced: self._on_placed,
            ComputationReady: self._on_ready,
            ComputationFailed: self._on_failed,
            ComputationClosed: self._on_closed,
            Error: self._on_error,
        }

    # -- nodes ---------------------------------------------------------------------

    def add_node(self, host: str, port: int, allocate: Allocator) -> asyncio.Task[None]:
        """Connect to a node and set the computation up on it.

        ``allocate(welcome, peer_ip)`` returns ``(cpus, bundle, files)``: the CPUs to
        use (0 rejects the node), the pickled computation and the files it needs.
        """
        link = self.nodes.get(format_address(host, port)) or self._new_link(host, port)
        return self._spawn(self._join(link, allocate))

    def _new_link(self, host: str, port: int) -> NodeLink:
        """Register a node being connected (it counts as one that may come)."""
        link = NodeLink(node_id=format_address(host, port), host=host, port=port)
        self.nodes[link.node_id] = link
        self._connecting += 1
        link.setting_up = True
        self._watch()
        return link

    async def _connect(self, host: str, port: int) -> tuple[Connection, Welcome]:
        config = self.config
        # dispy's ``dispy.config.MsgTimeout`` scales both timeouts (slow links).
        scale = max(dispy_config.MsgTimeout, 0.1) / dispy_config.DEFAULT_MSG_TIMEOUT
        return await connect(
            host,
            port,
            timeout=CONNECT_TIMEOUT * scale,
            handshake_timeout=HANDSHAKE_TIMEOUT * scale,
            secret=config.secret,
            max_message_size=config.max_message_size,
            ssl_context=config.ssl_context,
            name=config.client_name,
        )

    async def _join(self, link: NodeLink, allocate: Allocator) -> None:
        try:
            conn, welcome = await self._connect(link.host, link.port)
        except DispynbError as exc:
            self._fail_node(link, exc)
            return
        await self._attach(link, allocate, conn, welcome)

    async def _attach(
        self, link: NodeLink, allocate: Allocator, conn: Connection, welcome: Welcome
    ) -> None:
        """Set the computation up over an authenticated connection; then read it."""
        link.conn, link.welcome = conn, welcome
        link.closed = asyncio.get_running_loop().create_future()
        address = conn.peer_address
        link.peer_ip = address[0] if address is not None else link.host
        link.allocate = allocate
        link.shared_memory = shm.enabled() and shm.same_machine(
            link.peer_ip, welcome.boot_id, welcome.pid
        )
        try:
            self._set_up(link)
        except DispynbError as exc:
            self._fail_node(link, exc)
            return
        await self._read(link)

    def _set_up(self, link: NodeLink) -> None:
        """Ask the node to set the computation up (again, for `resetup_node`)."""
        assert link.conn is not None and link.welcome is not None
        assert link.allocate is not None
        config = self.config
        cpus, bundle, files = link.allocate(link.welcome, link.peer_ip)
        if cpus <= 0:
            raise SetupError(f"{link.node_id}: the node allocation rejected it")
        for ref in files:
            self._files[ref.digest] = ref
        self._post(
            link,
            ComputationSetup(
                comp_id=config.comp_id,
                name=config.name,
                workers=cpus,
                dest_path=config.dest_path,
                cleanup=config.cleanup,
                files=[[ref.relative, ref.digest, ref.size] for ref in files],
                pulse_interval=self.pulse,
                setup_timeout=config.setup_timeout,
                recovery_id=config.recovery_id,
                keep_results=config.keep_results,
                keep_sent=config.keep_sent,
                max_output=config.max_output,
                max_result=config.max_result,
                max_pids=config.max_pids,
                fresh_process=config.fresh_process,
            ),
            bundle,
        )

    def _settle(self, link: NodeLink) -> None:
        """``link`` leaves its setting-up phase (ready or failed)."""
        if link.setting_up:
            link.setting_up = False
            self._connecting -= 1

    def _fail_node(self, link: NodeLink, exc: DispynbError) -> None:
        self._settle(link)
        if link.conn is not None:
            link.conn.close()
        logger.warning("node %s cannot be used: %s", link.node_id, describe_error(exc))
        self.last_error = exc
        self.nodes.pop(link.node_id, None)
        self.events.node_failed(link, exc)
        self._abandon_if_no_nodes()

    async def _read(self, link: NodeLink) -> None:
        """Handle the node's messages until it is lost (or fails its setup).

        A handler that raises anything but a `DispynbError` (a bug, or a node's
        message we do not cope with) costs that node only: the error is logged with
        its traceback, the connection closed and the node's jobs treated as a lost
        node's; the cluster and the other nodes go on.
        """
        assert link.conn is not None
        loop = asyncio.get_running_loop()
        routes = self._routes
        ended: list[str | None] = []  # why reading stopped; None: the node failed

        def handle(message: Message, buffers: list[memoryview]) -> bool:
            link.last_seen = loop.time()
            route = routes.get(type(message))
            if route is None:
                return False  # nothing a client acts on (node -> client only)
            try:
                stop = route(link, message, buffers)
            except DispynbError:
                raise
            except Exception as exc:
                logger.error(
                    "error handling a %r message from node %s; dropping its connection",
                    message.op,
                    link.node_id,
                    exc_info=True,
                )
                reason = f"error handling its {message.op!r} message: {exc!r}"
                if link.setting_up:
                    self._fail_node(link, ClusterError(f"{link.node_id}: {reason}"))
                    ended.append(None)
                else:
                    ended.append(reason)
                return True
            if stop is None:
                return False
            ended.append(stop.reason)
            return True

        try:
            # Messages are handled in the socket's read callback: no task switch.
            await link.conn.dispatch(handle)
        except DispynbError as exc:
            if link.setting_up:
                self._fail_node(link, exc)
                return
            ended.append(describe_error(exc))
        finally:
            if link.closed is not None and not link.closed.done():
                link.closed.set_result(None)
        reason = ended[0] if ended else "connection closed"
        if reason is not None:
            self._lose_node(link, reason)

    # -- node messages (`_routes`) -------------------------------------------------

    def _on_status(
        self, link: NodeLink, message: NodeStatus, buffers: list[memoryview]
    ) -> None:
        self.events.node_status(link, message.avail)

    def _on_files_missing(
        self, link: NodeLink, message: FilesMissing, buffers: list[memoryview]
    ) -> None:
        known = [self._files[d] for d in message.digests if d in self._files]
        if len(known) < len(message.digests):
            logger.warning(
                "node %s asks for files this computation never sent", link.node_id
            )
        self._send_files(link, known)

    def _on_file(
        self, link: NodeLink, message: FileFromNode, buffers: list[memoryview]
    ) -> None:
        if self.state.runs_on(message.key, link.node_id):
            self.events.job_file(message.key, link, message.path, buffers)
        else:  # a job this node was not given (or no longer runs)
            logger.warning(
                "node %s sent file %r for job %d, which it does not run: not saved",
                link.node_id,
                message.path[:200],
                message.key,
            )

    def _on_placed(
        self, link: NodeLink, message: FilePlaced, buffers: list[memoryview]
    ) -> None:
        placed = self._placements.pop(message.request, None)
        if placed is not None and not placed.done():
            placed.set_result(message.error)

    def _on_failed(
        self, link: NodeLink, message: ComputationFailed, buffers: list[memoryview]
    ) -> _Stop:
        if link.setting_up:
            error = SetupError(f"{link.node_id}: {message.message}", message.traceback)
            self._fail_node(link, error)
            return _Stop(None)
        return _Stop(message.message)

    def _on_closed(
        self, link: NodeLink, message: ComputationClosed, buffers: list[memoryview]
    ) -> _Stop | None:
        if link.resetting:
            self._redo_setup(link)
            return None
        return _Stop("released" if link.releasing else "computation closed")

    def _on_error(
        self, link: NodeLink, message: Error, buffers: list[memoryview]
    ) -> None:
        logger.warning("node %s reports: %s", link.node_id, message.message)

    def _on_ready(
        self, link: NodeLink, message: ComputationReady, buffers: list[memoryview]
    ) -> None:
        self._settle(link)
        link.ready = True
        link.last_seen = asyncio.get_running_loop().time()
        link.cpus = message.workers
        self.events.node_ready(link)
        self._apply(self.state.handle(NodeJoined(link.node_id, message.workers)))

    # -- node management (dispy's allocate/deallocate/close/resetup_node) ---------

    def set_cpus(self, node_id: str, cpus: int) -> int:
        """Use ``cpus`` CPUs of a node from now on (0: send it no more jobs).

        Returns the CPUs now used (at most what the node set up), or -1 for an
        unknown node. Jobs already there finish.
        """
        link = self.nodes.get(node_id)
        if link is None or not link.ready:
            return -1
        cpus = max(0, min(cpus, link.cpus))
        self._apply(self.state.handle(NodeJoined(node_id, cpus)))
        return cpus

    def close_node(self, node_id: str, terminate: bool, release: bool = True) -> bool:
        """Close the computation on one node (after its jobs, unless ``terminate``).

        Jobs pinned to the node and not sent yet are cancelled here; the node
        cancels the jobs it holds that have not started (as in dispy, where a node
        holds only running jobs). With ``release`` the node then leaves the cluster
        for good: the connection is closed and never made again (dispy's
        ``close_node``); `add_node` brings it back.
        """
        link = self.nodes.get(node_id)
        if link is None or link.conn is None or not link.ready:
            return False
        self.set_cpus(node_id, 0)
        for key in self.state.pinned_keys(node_id):
            self._apply(self.state.handle(CancelRequested(key)))
        link.releasing = release
        with contextlib.suppress(DispynbError):
            self._post(
                link,
                ComputationClose(
                    comp_id=self.config.comp_id,
                    terminate=terminate,
                    cancel_waiting=True,  # the node cancels what has not started
                ),
            )
        return True

    def resetup_node(self, node_id: str, terminate: bool) -> bool:
        """Close the computation on a node and set it up again on the same node."""
        link = self.nodes.get(node_id)
        if link is None or not self.close_node(node_id, terminate, release=False):
            return False
        link.resetting = True
        return True

    def _redo_setup(self, link: NodeLink) -> None:
        link.ready = False
        self._apply(self.state.handle(NodeLeft(link.node_id)), lost_reason="re-setup")
        self.events.node_closed(link, "set up again")  # ``resetting`` still True
        link.resetting = False
        self._connecting += 1
        link.setting_up = True
        try:
            self._set_up(link)
        except DispynbError as exc:
            self._fail_node(link, exc)

    def running_keys(self, node_id: str) -> list[int]:
        """Keys of the jobs running on a node."""
        return self.state.running_keys(node_id)

    def _lose_node(self, link: NodeLink, reason: str) -> None:
        for stream in [s for s in self._streams if s[0] == link.node_id]:
            del self._streams[stream]  # its results will not come
        if link.conn is not None:
            link.conn.close()  # fencing: whatever it still sends is never read
        if self.nodes.pop(link.node_id, None) is None:
            return
        was_ready = link.ready
        if link.ready:
            link.ready = False
            self._apply(self.state.handle(NodeLeft(link.node_id)), lost_reason=reason)
            self.events.node_closed(link, reason)
        if (
            was_ready
            and not self._closing
            and not link.releasing
            and link.allocate is not None
        ):
            # It may come back (restarted, link healed): try again for a while.
            self._reconnecting += 1
            self._spawn(self._reconnect(link.host, link.port, link.allocate))
        self._abandon_if_no_nodes()

    async def _reconnect(self, host: str, port: int, allocate: Allocator) -> None:
        """Connect again to a lost node, with backoff, for up to RECONNECT_FOR s.

        A node that comes back authenticates anew and gets a fresh computation; what
        it may still send for the old one was on the old, closed connection.
        """
        loop = asyncio.get_running_loop()
        delay, deadline = RECONNECT_DELAY, loop.time() + RECONNECT_FOR
        conn: Connection | None = None
        welcome: Welcome | None = None
        try:
            while not self._closing and loop.time() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)
                if self._closing or format_address(host, port) in self.nodes:
                    return
                try:
                    conn, welcome = await self._connect(host, port)
                    break
                except DispynbError as exc:
                    logger.debug("node %s:%d still away: %s", host, port, exc)
        finally:
            self._reconnecting -= 1
        if conn is None or welcome is None or self._closing:
            if conn is not None:
                conn.close()
            self._abandon_if_no_nodes()
            return
        logger.info("node %s is back", format_address(host, port))
        link = self._new_link(host, port)
        await self._attach(link, allocate, conn, welcome)

    def _watch(self) -> None:
        """Start the pulse watchdog (once, on the I/O loop)."""
        if self._watchdog is None:
            self._watchdog = self._spawn(self._watch_pulses())

    async def _watch_pulses(self) -> None:
        """Ping the nodes every pulse; a node silent for DEAD_AFTER pulses is dead."""
        loop = asyncio.get_running_loop()
        pulse = self.pulse
        while not self._closing:
            expected = loop.time() + pulse / 2
            await asyncio.sleep(pulse / 2)
            now = loop.time()
            late = now - expected > pulse
            for link in list(self.nodes.values()):
                if not link.ready or link.conn is None:
                    continue
                if late:
                    # This loop was held up (a huge result?): the nodes' pulses may be
                    # waiting unread, so judge no one this round.
                    link.last_seen = now
                    continue
                if link.conn.reads != link.reads_seen:
                    # Bytes arrived (maybe of a message slower to cross the link
                    # than DEAD_AFTER pulses, with the pulses queued behind it).
                    link.reads_seen = link.conn.reads
                    link.last_seen = now
                silent = now - link.last_seen
                if silent > DEAD_AFTER * pulse:
                    logger.warning(
                        "node %s sent nothing for %.1f s: declared dead",
                        link.node_id,
                        silent,
                    )
                    self._lose_node(link, f"no pulse for {silent:.1f} s")
                    continue
                with contextlib.suppress(DispynbError):
                    link.conn.write(Ping())

    def _abandon_if_no_nodes(self) -> None:
        """With no node left (and none coming), queued jobs can never run."""
        if self._connecting > 0 or self._reconnecting > 0 or self.discovering:
            return
        if any(n.ready for n in self.nodes.values()):
            return
        for key in list(self._jobs):
            self._jobs.pop(key)
            self._release_segments(key)
            self.events.job_abandoned(key, None, self._no_node_reason())

    def _no_node_reason(self) -> str:
        reason = "no node is available to run the job"
        if self.last_error is not None:
            reason += f" (last node error: {describe_error(self.last_error)})"
        return reason

    @property
    def connecting(self) -> bool:
        """True while some node is still connecting or being set up."""
        return self._connecting > 0

    # -- jobs ----------------------------------------------------------------------

    def enqueue(
        self,
        key: int,
        buffers: list[Buffer],
        node: str | None = None,
        files: list[FileRef] | None = None,
        limits: tuple[float | None, int | None] | None = None,
    ) -> None:
        """Thread-safe: record a job; `drain` (on the loop) submits it.

        ``files`` are the job's own files, placed in the computation's directory on
        its node for the time it runs. ``limits``: ``(timeout, mem_limit)`` the node
        enforces (see `JobSubmit`), or None.
        """
        self._incoming.append((key, buffers, node, files, limits))

    def drain(self) -> None:
        """Submit every enqueued job in one scheduling pass (on the loop)."""
        incoming = self._incoming
        if not incoming:
            return
        instructions: list[Instruction] = []
        handle = self.state.handle
        jobs = self._jobs
        if (
            not self.nodes
            and self._connecting == 0
            and self._reconnecting == 0
            and not self.discovering
        ):
            while incoming:
                key = incoming.popleft()[0]
                self.events.job_abandoned(key, None, self._no_node_reason())
            return
        while incoming:
            key, buffers, node, files, limits = incoming.popleft()
            jobs[key] = _Pending(buffers, node, files, limits)
            instructions.extend(handle(JobSubmitted(key, node)))
        self._apply(instructions)

    def cancel(self, key: int, unstarted: bool = False, held: bool = False) -> None:
        """Cancel a job (on the loop): terminate it if it runs; with ``unstarted``
        only if it has not started; with ``held`` only if no node has it yet."""
        if held and not self.state.is_queued(key):
            return
        self._apply(self.state.handle(CancelRequested(key, unstarted)))

    def _send_files(self, link: NodeLink, files: list[FileRef]) -> None:
        """Send each file not yet sent on this connection (the node keeps them).

        Files are read (and checked against their digest) on a worker thread, never
        on the loop: `_pump` sends them in order, and what is `_post`-ed meanwhile
        (the jobs that need them) follows them on the wire.
        """
        for ref in files:
            if ref.digest in link.sent:
                continue
            link.sent.add(ref.digest)  # sent, or on its way
            self._files.setdefault(ref.digest, ref)
            link.outbox.append(ref)
        if link.outbox and not link.pumping:
            link.pumping = True
            self._spawn(self._pump(link))

    def _post(
        self, link: NodeLink, message: Message, buffers: list[Buffer] | None = None
    ) -> None:
        """Write ``message`` to a node after the files on their way to it.

        Raises `DispynbError` (from the connection) only when written at once.
        """
        if link.pumping:
            link.outbox.append((message, buffers or []))
            return
        assert link.conn is not None
        link.conn.write(message, buffers or ())

    async def _pump(self, link: NodeLink) -> None:
        """Write a node's outbox in order, reading its files off the loop."""
        loop = asyncio.get_running_loop()
        outbox = link.outbox
        try:
            while outbox:
                item = outbox.popleft()
                if isinstance(item, FileRef):
                    try:
                        data = await loop.run_in_executor(None, item.read)
                    except (OSError, DispynbError) as exc:
                        link.sent.discard(item.digest)
                        logger.warning(
                            "cannot send %s to node %s: %s (the jobs that need it "
                            "fail there)",
                            item.path,
                            link.node_id,
                            describe_error(exc),
                        )
                        continue
                    message: Message = FilePut(digest=item.digest, size=len(data))
                    buffers: list[Buffer] = [data]
                else:
                    message, buffers = item
                conn = link.conn
                if conn is None or conn.closed:
                    break  # its reader ends and settles the node's jobs
                with contextlib.suppress(DispynbError):
                    conn.write(message, buffers)
        finally:
            link.pumping = False
            outbox.clear()

    async def send_file(self, node_id: str, ref: FileRef) -> str:
        """Put a file into the computation's directory on a node; '' or an error."""
        link = self.nodes.get(node_id)
        if link is None or link.conn is None or not link.ready:
            return f"node {node_id} is not ready"
        request = next(self._requests)
        placed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._placements[request] = placed
        try:
            self._send_files(link, [ref])
            self._post(
                link,
                FilePlace(
                    comp_id=self.config.comp_id,
                    request=request,
                    path=ref.relative,
                    digest=ref.digest,
                ),
            )
            async with asyncio.timeout(CLOSE_TIMEOUT):
                return await placed
        except (DispynbError, OSError, TimeoutError) as exc:
            return f"cannot send {ref.relative} to {node_id}: {describe_error(exc)}"
        finally:
            self._placements.pop(request, None)

    def _on_provisional(
        self, link: NodeLink, message: JobProvisional, buffers: list[memoryview]
    ) -> None:
        if not self.state.is_running(message.key, message.attempt, link.node_id):
            return  # from an attempt we gave up on
        try:
            result = serialize.loads(buffers, self.config.result_types)
        except SerializationError as exc:
            logger.warning("provisional result of job %d dropped: %s", message.key, exc)
            return
        self.events.job_provisional(message.key, link, result)

    def _on_results(
        self, link: NodeLink, message: JobResults, buffers: list[memoryview]
    ) -> None:
        starts = message.started
        next_start = 0  # starts are replayed in the node's order among the results
        offset = 0
        instructions: list[Instruction] = []
        handle = self.state.handle
        for index, entry in enumerate(message.results):
            while next_start < len(starts) and starts[next_start][3] <= index:
                self._on_start(link, starts[next_start])
                next_start += 1
            record, streamed = ResultEntry.from_wire(entry)
            key, attempt, outcome, began, ended, stdout, stderr, exception, count = (
                record
            )
            self._release_segments(key, attempt)
            result_buffers: list[Any] | None
            if streamed:  # its buffers came in chunks
                result_buffers = self._take_stream(link, key, attempt, count)
            else:
                result_buffers = buffers[offset : offset + count]
                offset += count
            if outcome == RETURNED:
                # The node shuts down: no more jobs for it; this one runs elsewhere.
                if not link.leaving:
                    link.leaving = True
                    instructions.extend(handle(NodeJoined(link.node_id, 0)))
                instructions.extend(handle(JobReturned(link.node_id, key, attempt)))
                continue
            accepted = handle(
                JobFinished(link.node_id, key, attempt, max(ended - began, 0.0))
            )
            if not accepted or not isinstance(accepted[0], AcceptResult):
                instructions.extend(accepted)
                continue  # stale: an old attempt or a node we already gave up on
            instructions.extend(accepted[1:])
            self._jobs.pop(key, None)
            result = None
            if outcome == FINISHED and result_buffers is None:
                outcome, exception = CRASHED, "the result arrived incomplete"
            elif outcome == FINISHED:
                try:
                    result = serialize.loads(
                        result_buffers,  # type: ignore[arg-type]  # not None here
                        self.config.result_types,
                    )
                except SerializationError as exc:
                    outcome, exception = (
                        CRASHED,
                        f"the result cannot be unpickled here: {exc}",
                    )
            link.jobs_done += 1
            link.cpu_time += max(ended - began, 0.0)
            self.events.job_done(
                key,
                link,
                Outcome(outcome, result, stdout, stderr, exception, began, ended),
            )
        for start in starts[next_start:]:
            self._on_start(link, start)
        self._apply(instructions)

    def _on_start(self, link: NodeLink, start: list[Any]) -> None:
        """A job began executing on the node (``[key, attempt, time, before]``)."""
        key, attempt, when = start[0], start[1], start[2]
        if self.state.is_running(key, attempt, link.node_id):  # else: stale, or done
            self.events.job_running(key, link, when)

    def _on_chunk(
        self, link: NodeLink, message: ResultChunk, buffers: list[memoryview]
    ) -> None:
        """Copy a chunk of a large result into its place (allocated once)."""
        if not self.state.is_running(message.key, message.attempt, link.node_id):
            return  # not this node's job (or an attempt we gave up on): dropped
        stream_id = (link.node_id, message.key, message.attempt)
        parts = self._streams.setdefault(stream_id, {})
        if parts is None:
            return  # refused already
        target = parts.get(message.index)
        cap = self.config.max_result or self.config.max_message_size
        if target is None:
            total = sum(p[2] for p in parts.values()) + message.size
            if not 0 <= message.index < 4096 or not message.size >= 0 or total > cap:
                logger.warning(
                    "node %s streams a result of job %d over %d bytes: refused",
                    link.node_id,
                    message.key,
                    cap,
                )
                self._streams[stream_id] = None
                return
            # A bytes buffer grows in a BytesIO, whose getvalue() then hands over
            # its memory: one copy, as for a bytearray filled in place.
            place = io.BytesIO() if message.kind == "b" else bytearray(message.size)
            target = parts[message.index] = [place, 0, message.size]
        data = buffers[0] if len(buffers) == 1 else memoryview(b"")
        place, filled, size = target
        end = message.offset + data.nbytes
        in_order = message.offset == filled or not isinstance(place, io.BytesIO)
        if message.offset < 0 or end > size or not data.nbytes or not in_order:
            logger.warning("node %s sent a malformed result chunk", link.node_id)
            self._streams[stream_id] = None
            return
        if isinstance(place, io.BytesIO):
            place.write(data)
        else:
            place[message.offset : end] = data
        target[1] += data.nbytes

    def _take_stream(
        self, link: NodeLink, key: int, attempt: int, count: int
    ) -> list[bytes | bytearray] | None:
        """The buffers of a streamed result, or None if they are not all there."""
        parts = self._streams.pop((link.node_id, key, attempt), None)
        if parts is None or sorted(parts) != list(range(count)):
            return None
        if any(filled != size for _place, filled, size in parts.values()):
            return None
        return [
            place.getvalue() if isinstance(place, io.BytesIO) else place
            for place, _filled, _size in (parts[i] for i in range(count))
        ]

    def _apply(self, instructions: list[Instruction], lost_reason: str = "") -> None:
        """Carry out instructions; job batches are merged per node into one message."""
        batches: dict[str, list[tuple[int, int]]] = {}
        for instruction in instructions:
            if isinstance(instruction, SendJobs):
                batches.setdefault(instruction.node, []).extend(instruction.jobs)
            elif isinstance(instruction, CancelQueued):
                self._jobs.pop(instruction.key, None)
                self._release_segments(instruction.key)
                self.events.job_cancelled(instruction.key)
            elif isinstance(instruction, CancelRunning):
                link = self.nodes.get(instruction.node)
                if link is not None and link.conn is not None:
                    cancel = JobCancel(
                        comp_id=self.config.comp_id,
                        key=instruction.key,
                        attempt=instruction.attempt,
                        unstarted=instruction.unstarted,
                    )
                    # If the connection is going, NodeLeft settles the job.
                    with contextlib.suppress(DispynbError):
                        self._post(link, cancel)
            elif isinstance(instruction, AbandonJob):
                self._jobs.pop(instruction.key, None)
                self._release_segments(instruction.key)
                link = self.nodes.get(instruction.node)
                reason = f"node {instruction.node} was lost ({lost_reason or 'left'})"
                if instruction.lost_on:
                    reason = attempts_spent(instruction.lost_on, reason)
                self.events.job_abandoned(
                    instruction.key, link, reason, node_id=instruction.node
                )
            elif isinstance(instruction, ResubmitJob):
                self._release_segments(instruction.key)  # sent again, anew
                logger.info(
                    "resubmitting job %d (attempt %d)",
                    instruction.key,
                    instruction.attempt,
                )
                self.events.job_requeued(instruction.key)
        for node_id, jobs in batches.items():
            self._send_jobs(node_id, jobs)

    def _send_jobs(self, node_id: str, jobs: list[tuple[int, int]]) -> None:
        link = self.nodes[node_id]
        assert link.conn is not None
        entries: list[list[Any]] = []
        limits: list[list[Any]] = []
        buffers: list[Buffer] = []
        size = 0
        self.events.jobs_sent([key for key, _attempt in jobs], link)
        for key, attempt in jobs:
            pending = self._jobs[key]
            if pending.limits is not None:
                limits.append([key, *pending.limits])
            payload = pending.buffers
            nbytes = sum(memoryview(b).nbytes for b in payload)
            if link.shared_memory and nbytes >= shm.MIN_SIZE:
                payload = self._to_shared_memory(link, key, attempt, payload)
            if pending.files:
                self._send_files(link, pending.files)
                files = [[ref.relative, ref.digest] for ref in pending.files]
                entries.append([key, attempt, len(payload), files])
            else:
                entries.append([key, attempt, len(payload)])
            buffers.extend(payload)
            # Arguments in shared memory count at their full size too: the node
            # then gets each large job as soon as it is written, not all at the end.
            size += nbytes
            if size >= BATCH_BYTES:
                self._write_batch(link, entries, buffers, limits)
                entries, limits, buffers, size = [], [], [], 0
        if entries:
            self._write_batch(link, entries, buffers, limits)

    def _to_shared_memory(
        self, link: NodeLink, key: int, attempt: int, payload: list[Buffer]
    ) -> list[Buffer]:
        """Write a job's arguments to shared memory; the reference to send instead
        (the arguments themselves if that fails: the socket still works)."""
        try:
            name, reference = shm.write_segment(payload)
        except OSError as exc:  # /dev/shm full, say: this node's jobs use the socket
            link.shared_memory = False
            logger.warning(
                "cannot write arguments to shared memory for node %s (%s);"
                " sending them over the connection instead",
                link.node_id,
                exc,
            )
            return payload
        self._segments.setdefault(key, {})[attempt] = name
        return [reference]

    def _release_segments(self, key: int, attempt: int | None = None) -> None:
        """Unlink the shared memory of a job (of one attempt) that ended."""
        segments = self._segments.get(key)
        if segments is None:
            return
        names = list(segments.values()) if attempt is None else []
        if attempt is not None and (name := segments.pop(attempt, None)):
            names.append(name)
        if attempt is None or not segments:
            del self._segments[key]
        for name in names:
            shm.unlink(name)

    def _write_batch(
        self,
        link: NodeLink,
        entries: list[list[Any]],
        buffers: list[Buffer],
        limits: list[list[Any]],
    ) -> None:
        assert link.conn is not None
        # If the connection is going, its reader sees it end and the state requeues
        # or abandons these jobs.
        with contextlib.suppress(DispynbError):
            self._post(
                link,
                JobSubmit(comp_id=self.config.comp_id, jobs=entries, limits=limits),
                buffers,
            )

    # -- shutdown ------------------------------------------------------------------

    async def close(self, terminate: bool) -> None:
        """Close the computation on every node and the connections."""
        self._closing = True
        waits = []
        for link in list(self.nodes.values()):
            if link.conn is None or link.conn.closed:
                continue
            try:
                self._post(
                    link,
                    ComputationClose(comp_id=self.config.comp_id, terminate=terminate),
                )
            except DispynbError:
                continue
            if link.closed is not None:
                waits.append(link.closed)
        if waits:
            await asyncio.wait(waits, timeout=CLOSE_TIMEOUT)
        for link in list(self.nodes.values()):
            if link.conn is not None:
                link.conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for key in list(self._segments):
            self._release_segments(key)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
