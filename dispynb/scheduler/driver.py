"""`Driver`: the client's async glue between `SchedulerState` and node connections.

It runs on the client's I/O loop. It connects to nodes, sets the computation up on
each, feeds events to the pure `SchedulerState` and carries out its instructions:
job batches go out as one message per node per loop turn, results come back in
batches. What happens to user-visible jobs is reported through `JobEvents`, so this
layer knows job keys, not `DispyJob` objects.

Its parts: `dispynb.scheduler.link` (settings, `NodeLink`, `JobEvents`),
`outbox` (what goes to nodes), `results` (what comes back) and `membership`
(connecting, setting up, watching and losing nodes); this module has the message
routes, the job queue and shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from typing import Any

from dispynb.depends import FileRef
from dispynb.errors import ClusterError, DispynbError, MessageError, SetupError
from dispynb.protocol import shm
from dispynb.protocol.framing import Buffer
from dispynb.protocol.handshake import peer_text
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationClosed,
    ComputationFailed,
    ComputationReady,
    Error,
    FileFromNode,
    FilePlaced,
    FileSaved,
    FilesMissing,
    JobProvisional,
    JobResults,
    JobsPlaced,
    Message,
    NodeManaged,
    NodeStatus,
    ResultChunk,
    SchedulerNodes,
)
from dispynb.protocol.shmpool import SegmentPool
from dispynb.scheduler.events import (
    CancelRequested,
    Instruction,
    JobSubmitted,
    NodeJoined,
)
from dispynb.scheduler.link import (
    CLOSE_TIMEOUT,
    DEFAULT_PULSE,
    TERMINATE_CLOSE_TIMEOUT,
    Allocator,
    DriverConfig,
    JobEvents,
    NodeLink,
    Outcome,
    _Handler,
    _Pending,
    _Stop,
)
from dispynb.scheduler.membership import DriverNodes
from dispynb.scheduler.outbox import SHM_JOBS_PER_CPU
from dispynb.scheduler.state import SchedulerState
from dispynb.secret import split_credential

__all__ = [
    "Allocator",
    "Driver",
    "DriverConfig",
    "JobEvents",
    "NodeLink",
    "Outcome",
]

logger = logging.getLogger(__name__)


class Driver(DriverNodes):
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
                str | None,
            ]
        ] = collections.deque()
        self._files: dict[str, FileRef] = {}  # by digest: what nodes may ask for
        # Requests waiting for their answer by number: files placed (`send_file`:
        # its error, "" once done), a shared scheduler's nodes managed
        # (`manage_node`: its `NodeManaged`).
        self._placements: dict[int, asyncio.Future[str]] = {}
        self._managing: dict[int, asyncio.Future[NodeManaged]] = {}
        # Large results arriving in chunks: (node, key, attempt) -> index ->
        # [bytearray or BytesIO, bytes received, size]; None once refused.
        self._streams: dict[tuple[str, int, int], dict[int, list[Any]] | None] = {}
        self._requests = itertools.count(1)
        # Shared memory objects holding jobs' arguments: key -> attempt -> name,
        # back to the pool when the job ends (`_release_segments`).
        self._segments: dict[int, dict[int, str]] = {}
        self._pool: SegmentPool | None = None
        # Whether the latest job submitted has large arguments: nodes that take
        # them through shared memory then hold fewer jobs (`_limit_shared_memory`).
        self._large = False
        self._connecting = 0
        self._reconnecting = 0
        self.discovering = False  # nodes may still appear: queued jobs wait for them
        # Nodes released by close_node (until allocate_node names them): as in dispy,
        # queued jobs wait for allocate_node rather than end Abandoned.
        self.released: set[str] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self.pulse = config.pulse_interval or DEFAULT_PULSE
        self.last_error: DispynbError | None = None
        #: Why a shared scheduler revoked this cluster's user ("" unless it did):
        #: what every job that cannot run now ends with.
        self.revoked = ""
        self._closing = False
        #: Set by `drain_direct` when the loop should run soon (see there).
        self.direct_wake = False
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Node messages by type (the node server routes client messages alike).
        self._routes: dict[type[Message], _Handler] = {
            JobResults: self._on_results,
            JobProvisional: self._on_provisional,
            NodeStatus: self._on_status,
            SchedulerNodes: self._on_scheduler_nodes,
            JobsPlaced: self._on_jobs_placed,
            FilesMissing: self._on_files_missing,
            ResultChunk: self._on_chunk,
            FileFromNode: self._on_file,
            FilePlaced: self._on_placed,
            NodeManaged: self._on_managed,
            ComputationReady: self._on_ready,
            ComputationFailed: self._on_failed,
            ComputationClosed: self._on_closed,
            Error: self._on_error,
        }

    # -- node messages (`_routes`) -------------------------------------------------

    def _on_status(
        self, link: NodeLink, message: NodeStatus, buffers: list[memoryview]
    ) -> None:
        if message.leaving and not link.stopping:
            self._node_stopping(link, message.leaving)
            if self.nodes.get(link.node_id) is not link:
                return  # dropped: its jobs run elsewhere
        self.events.node_status(link, message.avail)

    def _on_scheduler_nodes(
        self, link: NodeLink, message: SchedulerNodes, buffers: list[memoryview]
    ) -> None:
        if message.comp_id == self.config.comp_id:
            self.events.scheduler_nodes(link, message)

    def _on_jobs_placed(
        self, link: NodeLink, message: JobsPlaced, buffers: list[memoryview]
    ) -> None:
        if message.comp_id == self.config.comp_id:
            self.events.jobs_placed(link, message)

    def _on_files_missing(
        self, link: NodeLink, message: FilesMissing, buffers: list[memoryview]
    ) -> None:
        if not all(isinstance(digest, str) for digest in message.digests):
            raise MessageError(f"node {link.node_id} sent malformed files-missing")
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
            error = self.events.job_file(message.key, link, message.path, buffers)
        else:  # a job this node was not given (or no longer runs)
            error = f"the client does not run job {message.key} on this node"
            logger.warning(
                "node %s sent file %r for job %d, which it does not run: not saved",
                link.node_id,
                message.path[:200],
                message.key,
            )
        if message.request:  # the job waits to learn whether it was written
            answer = FileSaved(
                comp_id=message.comp_id,
                key=message.key,
                request=message.request,
                error=error or "",
            )
            with contextlib.suppress(DispynbError):
                self._post(link, answer)

    def _on_placed(
        self, link: NodeLink, message: FilePlaced, buffers: list[memoryview]
    ) -> None:
        placed = self._placements.pop(message.request, None)
        if placed is not None and not placed.done():
            placed.set_result(message.error)

    def _on_managed(
        self, link: NodeLink, message: NodeManaged, buffers: list[memoryview]
    ) -> None:
        managed = self._managing.pop(message.request, None)
        if managed is not None and not managed.done():
            managed.set_result(message)

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
        if link.closes_sent > 1:  # the answer to an earlier close: wait for the last
            link.closes_sent -= 1
            return None
        if link.resetting:
            self._redo_setup(link)
            return None
        # Dropped now, not once reading stops: an allocate_node in between would
        # find it still there, closing, and be lost with it.
        self._lose_node(link, "released" if link.releasing else "computation closed")
        return _Stop(None)

    def _on_error(
        self, link: NodeLink, message: Error, buffers: list[memoryview]
    ) -> _Stop | None:
        if message.code == "quota" and link.setting_up:
            # A shared scheduler refusing this session (--max_sessions): it closes
            # the connection next; its reason is the cluster's, not a reset's.
            self._fail_node(link, SetupError(f"{link.node_id}: {message.message}"))
            return _Stop(None)
        if message.code == "revoked":
            # A shared scheduler revoked this user and closes the session next: its
            # jobs end with the reason, and the refused credential is not tried again.
            link.releasing = True
            self.revoked = peer_text(message.message, 500)
            self.last_error = ClusterError(message.message)
            return _Stop(message.message)
        if message.code == "zombie":
            # A shared scheduler took this client for gone (silent too long: it was
            # stopped, say) and ends the session next: its jobs end with the reason.
            return _Stop(peer_text(message.message, 500))
        # A shared scheduler's refusals (an exclusive=True declined...) are its own.
        who = "scheduler" if split_credential(self.config.secret)[0] else "node"
        logger.warning("%s %s reports: %s", who, link.node_id, message.message)
        return None

    def _on_ready(
        self, link: NodeLink, message: ComputationReady, buffers: list[memoryview]
    ) -> None:
        if type(message.workers) is not int or message.workers < 0:
            raise MessageError(
                f"node {link.node_id} is ready with {message.workers} workers"
            )
        self._settle(link)
        if (link.releasing or link.resetting) and not link.closes_sent:
            # close_node (or resetup_node) came while it was set up: closed at
            # once, never used (then set up anew: its allocate() runs again).
            self._send_close(link, terminate=False)
            return
        link.ready = True
        link.last_seen = asyncio.get_running_loop().time()
        link.cpus = message.workers
        link.acks_journaled = message.acks_journaled
        link.takes_pins = message.pins is True
        link.manages = frozenset(a for a in message.manages if type(a) is str)
        self.events.node_ready(link)
        if self._large and link.shared_memory:
            cap = SHM_JOBS_PER_CPU * max(1, link.cpus)
            self.state.limit_window(link.node_id, cap)
        # set_node_cpus or deallocate_node as it was set up: the last call decides.
        asked, link.cpus_asked = link.cpus_asked, None
        used = message.workers if asked is None else min(asked, message.workers)
        self._apply(self.state.handle(NodeJoined(link.node_id, used)))

    # -- jobs ----------------------------------------------------------------------

    def enqueue(
        self,
        key: int,
        buffers: list[Buffer],
        node: str | None = None,
        files: list[FileRef] | None = None,
        limits: tuple[float | None, int | None] | None = None,
        pin: str | None = None,
    ) -> None:
        """Thread-safe: record a job; `drain` (on the loop) submits it.

        ``files`` are the job's own files, placed in the computation's directory on
        its node for the time it runs. ``limits``: ``(timeout, mem_limit)`` the node
        enforces (see `JobSubmit`), or None. ``pin``: the node behind a shared
        scheduler that must run it (`JobSubmit.pins`), or None.
        """
        self._incoming.append((key, buffers, node, files, limits, pin))

    def drain_direct(self) -> bool:
        """`drain` from the submitting thread, with the loop entered
        (`LoopRunner.enter`) and so idle: True if done, False if the loop must do
        it (`drain`).

        Done here only when it writes nothing but small job messages on plain
        sockets ready to take them: the job reaches its node without waking the
        loop thread first. Anything else (files, large arguments, TLS, no node,
        a connection that is full or going) is left to the loop. Sets
        `direct_wake` if the loop must look at a connection afterwards (it filled
        up or failed meanwhile).
        """
        if self._closing or not self.nodes:
            return False
        for _key, buffers, _node, files, _limits, _pin in self._incoming:
            if files or len(buffers) != 1 or len(buffers[0]) >= shm.MIN_SIZE:
                return False
        for link in self.nodes.values():
            conn = link.conn
            if link.ready and (
                conn is None or link.pumping or not conn.writes_directly
            ):
                return False
        try:
            self.drain()
        except Exception:  # as on the loop (`Coalescer`): logged, never raised
            logger.exception("submitting jobs failed")
            self.direct_wake = True
        for link in self.nodes.values():
            conn = link.conn
            if link.ready and (conn is None or not conn.writes_directly):
                self.direct_wake = True
        return True

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
            and not self.nodes_may_come()
            and not self.released
        ):
            while incoming:
                key = incoming.popleft()[0]
                self.events.job_abandoned(key, None, self._no_node_reason())
            return
        while incoming:
            key, buffers, node, files, limits, pin = incoming.popleft()
            # Cheap test first: small arguments are one small pickle.
            large = (len(buffers) > 1 or len(buffers[0]) >= shm.MIN_SIZE) and sum(
                memoryview(b).nbytes for b in buffers
            ) >= shm.MIN_SIZE
            if large is not self._large:
                self._limit_shared_memory(large)
            jobs[key] = _Pending(buffers, node, files, limits, pin)
            instructions.extend(handle(JobSubmitted(key, node), dispatch=False))
        instructions.extend(self.state.dispatch(submitted=True))  # once for all
        self._apply(instructions)

    def cancel(self, key: int, unstarted: bool = False, held: bool = False) -> None:
        """Cancel a job (on the loop): terminate it if it runs; with ``unstarted``
        only if it has not started; with ``held`` only if no node has it yet."""
        if held and not self.state.is_queued(key):
            return
        self._apply(self.state.handle(CancelRequested(key, unstarted)))

    def cancel_many(
        self, keys: list[int], unstarted: bool = False, held: bool = False
    ) -> None:
        """`cancel` for many jobs, in order, in one pass (on the loop): the queued
        ones end together (`JobEvents.jobs_cancelled`), however many."""
        if held:
            is_queued = self.state.is_queued
            keys = [key for key in keys if is_queued(key)]
        self._apply(self.state.cancel_many(keys, unstarted))

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
        try:
            if waits:
                # Terminating, a node answers once it killed its jobs (within its 3 s
                # grace): one that does not is stopped or cut off, not worth 30 s.
                await asyncio.wait(
                    waits,
                    timeout=TERMINATE_CLOSE_TIMEOUT if terminate else CLOSE_TIMEOUT,
                )
            self._disconnect()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)
        finally:
            # Also when cancelled (a Ctrl-C in close() stops waiting for the
            # nodes): nothing outlives the cluster, its shared memory least of all
            # (/dev/shm outlives the process).
            self._disconnect()
            for key in list(self._segments):
                self._release_segments(key)
            if self._pool is not None:
                self._pool.close()

    def _disconnect(self) -> None:
        """Close the connections and cancel the tasks (again: nothing new)."""
        for link in list(self.nodes.values()):
            if link.conn is not None:
                link.conn.close()
        for task in list(self._tasks):
            task.cancel()
