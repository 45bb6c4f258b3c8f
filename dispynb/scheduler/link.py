"""What the driver shares with its parts: settings, a node as it sees it, and the
`JobEvents` it reports to the cluster."""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from dispynb.depends import FileRef
from dispynb.errors import DispynbError
from dispynb.protocol import serialize
from dispynb.protocol.fileuses import FileUses
from dispynb.protocol.framing import Buffer
from dispynb.protocol.messages import (
    JobsPlaced,
    Message,
    SchedulerNodes,
    Welcome,
)
from dispynb.transport.connection import Connection

#: A job batch is cut once its arguments pass this size (keeps messages moderate).
BATCH_BYTES = 8 * 1024 * 1024

#: Seconds between pulses when the cluster sets no ``pulse_interval``. Pulses are
#: how a silent node (power cut, link down, SIGSTOP) is found dead, after
#: DEAD_AFTER of them, whether or not a panel shows the load they carry; and the
#: interval is fixed when a computation is set up, so it could not follow a panel
#: opened later. They cost an idle notebook little: one cluster open on a node of
#: 2 CPUs, 60 s idle, the kernel used 0.16 s of CPU and the node 0.09 s (0.10 and
#: 0.03 s with pulses of 10 s), and its IOPub messages were the same (load figures
#: alone are shown every LOAD_INTERVAL, dispynb/jupyter/widgets.py).
DEFAULT_PULSE = 1.0

#: A node is declared dead after this many pulses without a word from it.
DEAD_AFTER = 3

#: Reconnection to a lost node: first delay, longest delay, and for how long (s).
RECONNECT_DELAY = 0.5
RECONNECT_DELAY_MAX = 5.0
RECONNECT_FOR = 60.0

#: Seconds a node gets to acknowledge closing the computation.
CLOSE_TIMEOUT = 30.0
#: ... when the computation closes with ``terminate`` (its jobs killed at once).
TERMINATE_CLOSE_TIMEOUT = 5.0


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
    #: The node takes `ResultsJournaled` for the computation (its
    #: `ComputationReady` said so): the results journaled are acknowledged.
    acks_journaled: bool = False
    #: A shared scheduler that runs a job on the node it is pinned to
    #: (`ComputationReady.pins`): ``submit_node`` goes through it.
    takes_pins: bool = False
    #: The `NodeManage` actions a shared scheduler takes (`ComputationReady.manages`).
    manages: frozenset[str] = frozenset()
    setting_up: bool = False
    jobs_done: int = 0
    cpu_time: float = 0.0
    closed: asyncio.Future[None] | None = None
    sent: set[str] = field(default_factory=set)  # digests of files it has
    #: Jobs' own files on this connection: the digests each job attempt sent here
    #: needs, and how many of those attempts need each digest; the computation's
    #: files (`setup_files`) are never let go. See `DriverOutbox._job_files_ended`.
    job_files: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    file_uses: FileUses = field(default_factory=FileUses)
    setup_files: set[str] = field(default_factory=set)
    #: Files `send_file` put in the computation's directory there, by path: set
    #: up again (`resetup_node`) it gets them with its setup, as dispy's node
    #: kept them.
    placed: dict[str, FileRef] = field(default_factory=dict)
    allocate: Allocator | None = None
    #: Its set-up failed as the cluster's NodeAllocate.allocate gave it no CPUs:
    #: the program's choice, said at debug (dispy said nothing).
    declined: bool = False
    peer_ip: str = ""
    resetting: bool = False
    #: CPUs `Driver.set_cpus` was asked for (0: deallocate_node) while it was
    #: being set up (again): used once ready, instead of all it set up.
    cpus_asked: int | None = None
    last_seen: float = 0.0  # loop time of the last message from it
    reads_seen: int = 0  # its connection's reads when the watchdog last looked
    leaving: bool = False  # it handed jobs back: it shuts down
    #: Why it shuts down, as it said (`NodeStatus.leaving`); "" until it does.
    stopping: str = ""
    releasing: bool = False  # close_node: once closed it leaves, not to come back
    #: `ComputationClose` messages not answered yet (close_node, resetup_node):
    #: the last answer does what ``releasing`` or ``resetting`` say then (the last
    #: call decides).
    closes_sent: int = 0
    #: One of them terminates the running jobs (``terminate_pending``).
    close_terminates: bool = False
    # Files to send (read off the loop) and the messages that must follow them,
    # in wire order; `pumping` while `Driver._pump` works through them.
    outbox: collections.deque[FileRef | tuple[Message, list[Buffer]]] = field(
        default_factory=collections.deque
    )
    pumping: bool = False
    #: On this machine and our user: large arguments go through shared memory.
    shared_memory: bool = False
    #: Shared memory refused a job's arguments once (the warning was given).
    shared_memory_refused: bool = False


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
    #: Bytes of the node's report of it: its result's buffers and its output
    #: (dispy counts a node's replies in its ``rx``).
    size: int = 0


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
    ) -> str | None:
        """A running job sent a file (``path`` is relative and checked); return
        why it was not saved (None or "" once it was: the job is told)."""

    def job_abandoned(
        self, key: int, node: NodeLink | None, reason: str, node_id: str = ""
    ) -> None:
        """A job cannot run anymore (its node, ``node_id``, is gone)."""

    def job_cancelled(self, key: int) -> None:
        """A queued job was cancelled before it ran."""

    def jobs_cancelled(self, keys: list[int]) -> None:
        """Queued jobs were cancelled together before they ran (`job_cancelled`
        of each, in order)."""

    def job_requeued(self, key: int) -> None:
        """A job's node was lost; the job waits to run elsewhere (reentrant)."""

    def batch(self) -> AbstractContextManager[None]:
        """``with events.batch():`` around the starts and ends of one message from
        a node (the cluster journals those ends in one transaction, and raises
        `JournalError` as it exits if it could not)."""
        ...

    def node_ready(self, node: NodeLink) -> None:
        """The computation is set up on ``node``."""

    def node_failed(self, node: NodeLink, error: DispynbError) -> None:
        """``node`` could not be used (connect, auth or setup failed)."""

    def node_closed(self, node: NodeLink, reason: str) -> None:
        """``node`` left the cluster (for a while only if ``node.resetting``: it is
        set up again, `resetup_node`)."""

    def node_status(self, node: NodeLink, avail: list[float | None]) -> None:
        """``node`` reported the resources it has available."""

    def scheduler_nodes(self, node: NodeLink, report: SchedulerNodes) -> None:
        """``node``, a shared scheduler, reported the nodes behind it
        (`dispynb.protocol.records.SharedNodeEntry` arrays, unchecked), why those
        that left did and the jobs requeued (unchecked)."""

    def jobs_placed(self, node: NodeLink, placed: JobsPlaced) -> None:
        """``node``, a shared scheduler, sent jobs to a node behind it (unchecked)."""


@dataclass(slots=True)
class _Pending:
    buffers: list[Buffer]
    node: str | None = None
    files: list[FileRef] | None = None
    limits: tuple[float | None, int | None] | None = None  # (timeout s, mem bytes)
    #: The node behind a shared scheduler it must run on (`JobSubmit.pins`).
    pin: str | None = None


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
    #: dispy's ``ping_interval``: a named node that is away (not started yet, or
    #: lost) is tried again this often for as long as the cluster is open, not only
    #: for RECONNECT_FOR seconds.
    ping_interval: float | None = None
    setup_timeout: float | None = None
    recovery_id: str | None = None
    keep_results: float = 0.0
    keep_sent: bool = True
    max_output: int | None = None
    max_result: int | None = None
    max_pids: int | None = None
    fresh_process: bool = False
    #: For a shared scheduler: the computation wants the nodes to itself; its
    #: client decides each node's use (`ComputationSetup.allocates`).
    exclusive: bool = False
    allocates: bool = False
    #: `ComputationSetup.python`: this Python (major.minor) if code travels compiled.
    python: str = ""
    #: Restricted unpickling of results (``result_types``); None: plain pickle.
    result_types: serialize.AllowList | None = None
    #: For nodes this process started (a `LocalCluster`'s ``exit_reason``): why the
    #: node at ``(host, port)`` has exited for good, or None. A lost node that has
    #: exited is not tried again (its queued jobs need not wait RECONNECT_FOR s).
    node_exited: Callable[[str, int], str | None] | None = None
    #: For nodes a launcher starts (its ``expecting_nodes``): whether a node may
    #: still come. Queued jobs wait while one may; without, they end Abandoned.
    nodes_expected: Callable[[], bool] | None = None
