"""`ResultOutbox`: what a node's client session sends its client.

Results that arrive during one turn of the event loop travel in one message per
computation, job starts ride on them, large results travel in chunks; and when the
client stops reading, the session's workers are not read either (back-pressure).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from dispynb.defaults import PRE_AUTH_MAX_FRAME
from dispynb.errors import DispynbError
from dispynb.protocol.chunks import (
    chunk_bytes_for,
    fit_message,
    holds_utf8,
    split_entry,
)
from dispynb.protocol.messages import (
    Error,
    FileFromNode,
    JobProvisional,
    JobResults,
    Message,
)
from dispynb.transport.connection import Connection
from dispynb.wording import counted
from nodeserver.computation import STREAM_BYTES, Computation

#: Logs as the session it serves.
logger = logging.getLogger("nodeserver.session")

#: Seconds a job's start may wait to ride on a results message: a job shorter than
#: this costs no message of its own for its start (latency of tiny jobs, W2).
START_REPORT_DELAY = 0.005

#: A results batch is cut once its buffers pass this size.
BATCH_BYTES = 32 * 1024 * 1024

#: A result of `STREAM_BYTES` or more (its pickled buffers) travels in `ResultChunk`
#: messages of `CHUNK_BYTES`, so the client can assemble it in place.
CHUNK_BYTES = 16 * 1024 * 1024

#: A client that takes messages of this size or more gets its results as they come
#: (batched, large ones streamed); to a client that takes less, each message is cut
#: to its limit (`dispynb.protocol.chunks.fit_message`).
FIT_BELOW = 256 * 1024 * 1024

#: Characters of output (4 bytes each at most in UTF-8) over which a result is
#: streamed, its output in chunks, whatever its buffers.
STREAM_OUTPUT = STREAM_BYTES // 4

#: Bytes queued for a client (not yet taken by its socket) over which this session's
#: computations stop reading from their workers until the queue has drained: a client
#: that does not read holds at most this much here, plus one result per worker.
OUT_HIGH = 32 * 1024 * 1024


#: Why a job's file did not reach its client (`ResultOutbox.file_reporter`).
CLIENT_GONE = (
    "the client's connection to the node ended before it confirmed the file "
    "(the client stopped or was cut off); the file was not saved"
)


class ResultOutbox:
    """One client connection's outgoing messages (see the module docstring).

    ``computations`` is the session's own table (shared, not copied): the outbox
    asks whether a computation is idle, which kinds its results have, and holds or
    releases its workers. ``spawn`` runs a task for as long as the session lives.
    """

    def __init__(
        self,
        conn: Connection,
        computations: dict[int, Computation],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.conn = conn
        self._computations = computations
        self._spawn = spawn
        self._out: dict[int, tuple[list[list[Any]], list[memoryview]]] = {}
        self._starts: dict[int, list[list[Any]]] = {}  # comp_id -> job starts
        self._starts_timer: asyncio.TimerHandle | None = None
        self._oldest_start: float | None = None  # time.time() of the first waiting
        self._flush_pending = False
        #: Computation id -> the largest message its client takes, if under
        #: `FIT_BELOW` (see `client_limit`).
        self._fit: dict[int, int] = {}
        #: Workers are not read: the client is not reading.
        self.held = False
        #: Messages not sent because the connection had ended: the first is
        #: logged, the others counted (`report_lost`), not a line each.
        self.lost = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # see `_running_loop`

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The session's loop, looked up once: `asyncio.get_running_loop` makes a
        ``getpid`` system call each time (Python 3.11), and job starts arm a timer
        every few milliseconds."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def client_limit(self, comp_id: int, max_message_size: int) -> None:
        """The client takes messages of at most ``max_message_size`` bytes (0: not
        said) for computation ``comp_id``."""
        if 0 < max_message_size < FIT_BELOW:
            self._fit[comp_id] = max(max_message_size, PRE_AUTH_MAX_FRAME)
        else:
            self._fit.pop(comp_id, None)

    def provisional_reporter(
        self, comp_id: int
    ) -> Callable[[int, int, list[memoryview]], None]:
        """Send a computation's provisional results (after its waiting starts)."""

        def report(key: int, attempt: int, buffers: list[memoryview]) -> None:
            if comp_id in self._starts:
                self.flush()  # the job's start first
            self.write(
                JobProvisional(comp_id=comp_id, key=key, attempt=attempt), buffers
            )

        return report

    def file_reporter(
        self, comp_id: int
    ) -> Callable[[int, str, list[memoryview], int], str]:
        """Send the files a computation's jobs send (`dispy_send_file`); the
        reporter returns why one could not be sent ("" once it is on its way)."""

        def report(key: int, path: str, buffers: list[memoryview], request: int) -> str:
            if self.conn.closed:
                return CLIENT_GONE
            self.flush()  # the job's earlier results first
            message = FileFromNode(comp_id=comp_id, key=key, path=path, request=request)
            return "" if self.write(message, buffers) else CLIENT_GONE

        return report

    def starter(self, comp_id: int) -> Callable[[int, int, float], None]:
        """Report a computation's job starts (riding on results when they can)."""

        def started(key: int, attempt: int, when: float) -> None:
            # Results queued before this start come before it (see `JobResults`).
            results = self._out.get(comp_id)
            before = len(results[0]) if results is not None else 0
            starts = self._starts.get(comp_id)
            if starts is None:
                starts = self._starts[comp_id] = []
            starts.append([key, attempt, when, before])
            if self._oldest_start is None:
                self._oldest_start = when
            if self._starts_timer is None:
                self._starts_timer = self._running_loop().call_later(
                    START_REPORT_DELAY, self._starts_due
                )

        return started

    def queue_result(
        self,
        comp_id: int,
        entry: list[Any],
        buffers: list[memoryview],
    ) -> None:
        """Send a result entry with the others of this loop turn (a large one now,
        in chunks)."""
        # Sized once, and only when there are buffers (the usual one: no generator).
        size = 0
        if buffers:
            size = (
                buffers[0].nbytes
                if len(buffers) == 1
                else sum(b.nbytes for b in buffers)
            )
            limit = self._fit.get(comp_id) if self._fit else None
            if size >= STREAM_BYTES or (
                limit is not None and size >= chunk_bytes_for(limit)
            ):
                # Large, or to be cut to the client's small limit anyway: in chunks
                # now, while its buffers' kinds are known (a bytes result is then
                # built in place by the client, not copied from a bytearray).
                self._stream_result(comp_id, entry, buffers)
                return
        out, err = entry[5], entry[6]
        if (out or err or entry[7]) and (
            len(out) + len(err) >= STREAM_OUTPUT or holds_utf8(entry)
        ):
            # Its output in chunks; output kept as UTF-8 (`Utf8Text`, large) goes
            # as it is, not decoded into the entry's header.
            self._stream_result(comp_id, entry, buffers)
            return
        batch = self._out.get(comp_id)
        if batch is None:
            batch = self._out[comp_id] = ([], [])
        batch[0].append(entry)
        if buffers:
            batch[1].extend(buffers)
        computation = self._computations.get(comp_id)
        if size > BATCH_BYTES or (computation is not None and computation.idle):
            self.flush()  # big, or nothing else to wait for: send it now
        elif not self._flush_pending:
            self._flush_pending = True
            self._running_loop().call_soon(self.flush)

    def _stream_result(
        self, comp_id: int, entry: list[Any], buffers: list[memoryview]
    ) -> None:
        """Send a large result's buffers (views: nothing is copied) and large output
        in chunks, then its entry, marked streamed."""
        self.flush()  # the results before it first
        computation = self._computations.get(comp_id)
        kinds = computation.result_kinds.get(entry[0], "") if computation else ""
        streamed, chunks = split_entry(comp_id, entry, buffers, kinds, CHUNK_BYTES)
        for chunk, part in chunks:
            self.write_fit(comp_id, chunk, [part])
        self.write_fit(comp_id, JobResults(comp_id=comp_id, results=[streamed]), [])

    def _starts_due(self) -> None:
        """Send the waiting starts once the oldest has waited START_REPORT_DELAY.

        A results message takes the starts it finds without cancelling this timer:
        with jobs back to back, one timer then serves many jobs instead of each job
        arming and cancelling one of its own. When it fires early for the starts
        waiting now (armed for an earlier one), it is armed again for the rest of
        their delay: a start that its result will soon carry costs no message.
        """
        self._starts_timer = None
        if not self._starts or self._oldest_start is None:
            return
        # Clamped: the wall clock may have been set back meanwhile.
        rest = START_REPORT_DELAY - (time.time() - self._oldest_start)
        if rest <= START_REPORT_DELAY / 10:
            self.flush()
        else:
            self._starts_timer = self._running_loop().call_later(
                min(rest, START_REPORT_DELAY), self._starts_due
            )

    def flush(self) -> None:
        """Send the queued results and starts now."""
        self._flush_pending = False
        self._oldest_start = None
        out, self._out = self._out, {}
        starts, self._starts = self._starts, {}
        for comp_id, (entries, buffers) in out.items():
            started = starts.pop(comp_id, [])
            message = JobResults(comp_id=comp_id, results=entries, started=started)
            if self._fit:
                self.write_fit(comp_id, message, buffers)
            else:
                self.write(message, buffers)
        for comp_id, started in starts.items():
            self.write(JobResults(comp_id=comp_id, results=[], started=started))

    def write_fit(
        self, comp_id: int, message: Message, buffers: list[memoryview] | None = None
    ) -> None:
        """`write`, cut to the client's limit if it said a small one (for
        computation ``comp_id``: `dispynb.protocol.chunks.fit_message`)."""
        limit = self._fit.get(comp_id)
        if limit is None:
            self.write(message, buffers)
            return
        for part, part_buffers in fit_message(message, buffers or [], limit):
            self.write(part, part_buffers)

    def write(self, message: Message, buffers: list[memoryview] | None = None) -> bool:
        """Send ``message``; False if the connection ended (the first such message
        logged, the others counted: see `report_lost`; never raised)."""
        try:
            self.conn.write(message, buffers or ())
        except DispynbError as exc:
            if not self.lost:
                # A client gone while thousands of results were on their way (its
                # jobs, cancelled as its computation closes) made a line each.
                logger.info("cannot send %s to %s: %s", message.op, self.conn.peer, exc)
            self.lost += 1
            return False
        if not self.held and self.conn.unsent > OUT_HIGH:
            self._hold_workers()
        return True

    def report_lost(self) -> None:
        """The session is over (call once): log how many messages after the first
        logged one could not be sent, if any."""
        if self.lost > 1:
            logger.info(
                "%s to %s not sent: the connection had ended",
                counted(self.lost - 1, "more message"),
                self.conn.peer,
            )

    def send_error(self, code: str, text: str) -> None:
        """Tell the client something went wrong (the session goes on)."""
        self.write(Error(code=code, message=text))

    def _hold_workers(self) -> None:
        """Back-pressure: the client is not taking what we send, so stop reading
        results (and output, files) from the workers until it has."""
        self.held = True
        logger.debug("%s is not reading: holding its workers", self.conn.peer)
        for computation in self._computations.values():
            computation.hold_workers(True)
        self._spawn(self._release_when_drained())

    async def _release_when_drained(self) -> None:
        try:
            await self.conn.flush()
        except DispynbError:
            return  # the connection ended: serve() closes the computations
        self.held = False
        for computation in list(self._computations.values()):
            computation.hold_workers(False)
