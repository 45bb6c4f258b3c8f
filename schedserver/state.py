"""The shared scheduler's state (its nodes, clients, computations and the files
kept for them) and the helpers every part of `SchedulerServer` uses."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dispynb.backends.finder import NodeFinder
from dispynb.deploy.registry import Registrar
from dispynb.protocol.messages import Message
from dispynb.transport.addressing import format_address
from dispynb.transport.admission import MAX_PENDING_PER_SOURCE, Tally
from dispynb.transport.connection import Connection
from dispynb.transport.listener import Listener
from schedserver.computation import SharedComputation, Upstream
from schedserver.config import SchedulerConfig
from schedserver.depfiles import ClientFiles, files_quota
from schedserver.fairshare import FairShare
from schedserver.monitor import SchedulerMonitor
from schedserver.session import SchedulerSession
from schedserver.spill import SpillStore
from schedserver.users import UsersFile

#: The scheduler's logger, whichever part of it logs.
logger = logging.getLogger("schedserver.server")

#: Connections the scheduler has in their handshake with one node at once: half of
#: what a node admits from one address (`MAX_PENDING_PER_SOURCE`), leaving the rest
#: to other programs on the scheduler's host.
CONNECTS_PER_NODE = max(1, MAX_PENDING_PER_SOURCE // 2)


@dataclass(eq=False)
class NodeState:
    """A node the scheduler owns."""

    host: str
    port: int
    cpus: int = 0
    alive: bool = False
    in_flight: int = 0
    #: As the node reports it (`Welcome.avail`: None for a figure it cannot read).
    avail: list[float | None] = field(default_factory=list)
    #: It sent a malformed resource report (`reported_avail` said so once).
    avail_malformed: bool = False
    conn: Connection | None = None
    #: The host name the node reports ("" until it is up).
    hostname: str = ""
    #: Its ``platform.platform()``, as it said it (`Welcome.platform`; "" until up).
    platform: str = ""
    #: The largest message it takes (`Welcome.max_message_size`; 0 until up):
    #: nothing larger is sent to it (`schedserver.nodelimits`).
    max_message_size: int = 0
    #: Mean run time of its recent jobs (None: unknown), for how many to send ahead.
    mean: float | None = None
    #: The pulse watchdog's view (`_Pulse._watch_nodes`): loop time the node was
    #: last heard from, and its connections' reads counted then.
    last_seen: float = 0.0
    reads_seen: int = 0
    #: Why it was declared dead ("" while it is not): what its computations report.
    dead_reason: str = ""
    #: Why it is not up now, for its operator (the web monitor): why it went down
    #: (`went_down`), and why connecting to it again fails ("" while it is up).
    down: str = ""
    went_down: str = ""
    #: It handed jobs back: it shuts down (draining), so no job goes to it until it
    #: is up again.
    leaving: bool = False
    #: Why it shuts down, as it said (`NodeStatus.leaving`); "" until it does.
    stopping: str = ""
    #: It registered itself (``--register_port``): forgotten once unreachable for
    #: ``forget_registered`` s, since it registers again when it is back.
    registered: bool = False
    #: Held while connecting to it (TCP and handshake): the node admits only
    #: `CONNECTS_PER_NODE` handshakes at once from one address, so a burst of
    #: setups queues here instead of being refused by the node.
    connecting: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(CONNECTS_PER_NODE), repr=False
    )
    #: ``host:port``.
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = format_address(self.host, self.port)


class _ServerState:
    """The state of the shared scheduler. The methods declared here and raising
    `NotImplementedError` are the parts' own (one part calls another's)."""

    def __init__(self, config: SchedulerConfig) -> None:
        config.validate()
        self.config = config
        self.users = UsersFile(config.users_file)
        #: Why the users file cannot be read now, as last warned ("": it can).
        self._users_trouble = ""
        #: A computation could not reach a node for want of descriptors (warned).
        self._descriptors_warned = False
        self.nodes = [NodeState(host, port) for host, port in config.nodes]
        self.sessions: set[SchedulerSession] = set()
        self.computations: list[SharedComputation] = []
        self.fair = FairShare(config.max_cpus, config.exclusive_users)
        self.spill = SpillStore(
            config.dest_path_prefix, config.kept_memory, config.max_user_kept
        )
        #: Files clients uploaded, on disk while a computation needs them.
        self.files = ClientFiles(
            self.spill, config.max_file_size, config.max_files or files_quota()
        )
        self._wanted: dict[str, set[tuple[SharedComputation, Upstream]]] = {}
        self._orders = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: Listener | None = None
        self._finder: NodeFinder | None = None
        self._registrars: list[Registrar] = []
        self.monitor: SchedulerMonitor | None = None
        #: Sessions refused over --max_sessions, logged as counts per user.
        self._session_refusals = Tally(logger)
        #: Messages of its users refused (each user may send them at will), logged
        #: as counts per user.
        self.message_refusals = Tally(logger)
        self.port = 0
        self.stopping = False
        #: `time.monotonic` when it was made (its health probes' uptime).
        self.started = time.monotonic()
        #: A dispatch is due at the loop's next turn (`_Dispatch.schedule_soon`).
        self._dispatch_due = False
        #: Set to run the pulse now (`_Pulse.pulse_changed`).
        self._pulse_wake = asyncio.Event()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def total_cpus(self) -> int:
        """CPUs of the nodes alive now."""
        return sum(node.cpus for node in self.nodes if node.alive)

    # -- the parts' methods, declared for the others --

    def _attach(self, comp: SharedComputation, node: NodeState) -> None:
        raise NotImplementedError

    def _give_files(
        self, comp: SharedComputation, upstream: Upstream, digests: list[str]
    ) -> None:
        raise NotImplementedError

    def _release_files(self, comp: SharedComputation) -> None:
        raise NotImplementedError

    def write(
        self,
        upstream: Upstream,
        message: Message,
        buffers: list[memoryview] | None = None,
    ) -> None:
        """Send to a node (`dispatch._Dispatch.write`)."""
        raise NotImplementedError

    def schedule(self) -> None:
        """Hand free slots out now (`dispatch._Dispatch.schedule`)."""
        raise NotImplementedError

    def refuse_upstream(
        self, comp: SharedComputation, upstream: Upstream, why: str
    ) -> None:
        """``upstream``'s node cannot take ``comp`` (`nodelinks._NodeLinks`)."""
        raise NotImplementedError

    def room_freed(self, user: str) -> None:
        """Something of ``user``'s was let go (files, kept results): a computation
        of hers held over her --max_user_kept gets CPUs again now, not at the next
        dispatch something else brings (on an idle scheduler, her return)."""
        account = self.spill.user(user)
        if account.holding:
            account.holding = False  # `KeptMessages.full` flags those still held
            self.schedule()
