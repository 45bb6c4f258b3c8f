"""The state of a node's client session, shared by the parts of `ClientSession`
(`sessionfiles`, `sessionrecovery`), and the helpers they all use."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

from dispynb.protocol.messages import FilePut
from dispynb.transport.connection import Connection
from dispynb.transport.links import READ_LOWAT
from nodeserver import sharedbody
from nodeserver.computation import Computation
from nodeserver.keptresults import Kept
from nodeserver.outbox import ResultOutbox
from nodeserver.sessionmemory import SessionMemory

if TYPE_CHECKING:
    from nodeserver.server import NodeServer

#: The session's logger, whichever part of it logs.
logger = logging.getLogger("nodeserver.session")

#: Seconds a shutting-down node waits for a client to take back its unstarted jobs.
HAND_BACK_TIMEOUT = 5.0

_session_ids = itertools.count(1)


class _SessionState:
    """One client session's state: its computations, its outgoing messages
    (`outbox`), its shared memory (`memory`), the files it sent and the results
    kept for it."""

    def __init__(self, conn: Connection, server: NodeServer, client_name: str) -> None:
        self.conn = conn
        if sharedbody.AVAILABLE:
            # Large messages land in memory the workers can map: a job's arguments
            # reach its worker without a copy (`nodeserver.sharedbody`).
            conn.decoder.take_body = sharedbody.BODIES.take
        # A large message is read in large pieces, not as every few segments come
        # (fewer wake-ups and reads per MB); nothing here watches its progress.
        conn.read_lowat = READ_LOWAT
        self.server = server
        self.client_name = client_name
        self.session_id = next(_session_ids)
        self._computations: dict[int, Computation] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.outbox = ResultOutbox(conn, self._computations, self._spawn)
        self.memory = SessionMemory()
        self._last_heard = time.monotonic()
        # -- files (`sessionfiles`)
        self._waiting_for_files: dict[int, tuple[set[str], Any]] = {}
        self._refused_files: dict[str, str] = {}  # digest -> why
        # Files this client sent, held in the store until the session ends: another
        # client's computation closing must not remove an object this one uses.
        self._file_holds: set[str] = set()
        # A large file waiting to be stored off the loop (`serve` stores it).
        self._deferred_file: tuple[FilePut, memoryview] | None = None
        self._transferred = 0  # bytes of files received (--transfer-quota)
        #: Bytes received per file the session holds, given back by FileRelease.
        self._file_sizes: dict[str, int] = {}
        # -- recovery (`sessionrecovery`)
        self._recovery: dict[int, tuple[str, float]] = {}  # comp_id -> (id, keep)
        # Computations kept only for a crash (dispy's default recovery): a client
        # that goes silent while connected frees them, as one without recovery.
        self._crash_only: set[int] = set()
        self._orphaned = False  # this node closed the connection of a silent client
        #: Its messages wait unread until its client has taken what was sent to
        #: it; and what its client had taken at the last pulse
        #: (`ClientSession._heard_as_it_reads`).
        self._catching_up = False
        self._taken = 0
        #: The kept computations it claimed, each with the callback its recovery
        #: gave (`Kept.deliver`, unless a later recovery's replaced it).
        self._claims: list[tuple[Kept, Any]] = []
        #: The kept computations its client recovers, by the comp_id it gave.
        self._recovering: dict[int, Kept] = {}

    @property
    def computation_count(self) -> int:
        """The client's computations on this node now."""
        return len(self._computations)

    @property
    def last_heard(self) -> float:
        """`time.monotonic` when the client's last message arrived."""
        return self._last_heard

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
