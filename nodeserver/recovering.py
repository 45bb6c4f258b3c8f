"""`KeptResultSender`: the results a node kept for a crashed client, sent to the client
that recovers them (``dispynb.recover_jobs``).

One result per message; a result too large for one message of the client (or as large
as the node streams a live result) goes in `ResultChunk` messages, cut as a live one is
(`dispynb.protocol.chunks.split_entry`: its buffers, and its stdout and stderr when
they are large), then its entry marked streamed, so the client assembles it in place.
A spooled result is read from its file only when its turn comes, in a thread, into a
copy only the node reaches (`nodeserver.spoolcheck.private_copy`: over 1 MiB a file
with no name, sent through a read-only map of it, page cache rather than this
process's heap), and the next one waits until the socket has taken most of it: the
node holds about one chunk per recovering client in memory, whatever the number and
size of the kept results.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from dispynb.errors import KeptUnavailable
from dispynb.protocol.chunks import chunk_bytes_for, entry_text_bytes, split_entry
from dispynb.protocol.messages import (
    ComputationClosed,
    FileFromNode,
    JobProvisional,
    JobResults,
    Recovered,
)
from dispynb.transport.connection import Connection
from nodeserver.computation import STREAM_BYTES
from nodeserver.keptresults import FILE, PROVISIONAL, Kept, KeptResult, lost_entry
from nodeserver.spoolfile import job_of

logger = logging.getLogger(__name__)

#: Largest chunk of a streamed kept result (as a live result's chunks).
CHUNK_BYTES = 16 * 1024 * 1024

#: Room for the header of a kept file's message (its path: a few KiB at most).
_HEADER_ROOM = 64 * 1024


class KeptResultSender:
    """Sends one claimed computation's kept results to the recovering client.

    ``max_message_size`` is the largest message the client accepts (it says so in
    its `Recover`); `deliver` is the keeper's callback for results recorded while
    the client is connected. `run` sends what was recorded, `Recovered`, and (if
    jobs still run) what they return, then `ComputationClosed`.
    """

    def __init__(self, conn: Connection, comp_id: int, max_message_size: int) -> None:
        self.conn = conn
        self.comp_id = comp_id
        self.max_message_size = max_message_size
        # A result this large (its buffers and output) is streamed, in chunks small
        # enough to leave room for the message's header in the client's limit.
        self.stream_bytes = min(STREAM_BYTES, chunk_bytes_for(max_message_size))
        self.chunk_bytes = min(CHUNK_BYTES, chunk_bytes_for(max_message_size))
        self._live: collections.deque[KeptResult] = collections.deque()
        self._wake = asyncio.Event()
        #: Why each result the node cannot read now was not sent (`KeptUnavailable`).
        self._unavailable: list[str] = []
        #: The keys of the jobs whose results those are (a file or a provisional
        #: result a job sent is no job's end): told to the client, whose other
        #: jobs are not concerned (`Error.keys`).
        self.unavailable_keys: list[int] = []

    def deliver(self, result: KeptResult) -> None:
        """A result recorded now (a job that ended while the client is here)."""
        self._live.append(result)
        self._wake.set()

    async def run(self, kept: Kept, recorded: list[KeptResult]) -> bool:
        """Send every kept result, `Recovered` after the ones recorded so far, and
        `ComputationClosed` once the computation's jobs have all ended (if they had
        not); return whether everything was written (the connection may end first:
        then the results stay kept for another try).

        Raises `KeptUnavailable` before `Recovered` (or `ComputationClosed`) if a
        result could not be read now, once every other one was sent: one result the
        node could not copy held back all those behind it until the next
        ``recover_jobs``."""
        for result in recorded:
            await self._send(kept, result)
        await self._send_live(kept)
        self._raise_unavailable()
        if kept.finished.is_set():  # nothing more will come
            # Kept by a node process that died while its jobs ran: those it had
            # no end of were lost with it.
            cut_short = kept.spool is not None and kept.spool.cut_short
            self._write(
                Recovered(
                    comp_id=self.comp_id, found=True, running=False, cut_short=cut_short
                )
            )
            return True
        self._write(Recovered(comp_id=self.comp_id, found=True, running=True))
        while True:
            await self._send_live(kept)
            # Results are recorded before the computation is marked finished: with
            # none waiting now, none will come.
            if kept.finished.is_set():
                break
            await self._next(kept)
        self._raise_unavailable()
        self._write(ComputationClosed(comp_id=self.comp_id))
        return True

    def _raise_unavailable(self) -> None:
        """`KeptUnavailable` saying why the results not sent were not, if any were
        not (each reason once: a node short of memory fails them all alike)."""
        if self._unavailable:
            raise KeptUnavailable("; ".join(dict.fromkeys(self._unavailable)))

    async def _next(self, kept: Kept) -> None:
        """Wait for a result recorded, or the computation finished."""
        self._wake.clear()
        waits = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(kept.finished.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _send_live(self, kept: Kept) -> None:
        while self._live:
            await self._send(kept, self._live.popleft())

    async def _send(self, kept: Kept, result: KeptResult) -> None:
        """One result: whole in one message, or in chunks, then its entry."""
        try:
            if result.path is None:
                entry, buffers, kinds = kept.open(result)
            else:  # copied and checked (a large one takes a while): not on the loop
                entry, buffers, kinds = await _in_thread(kept, result)
        except KeptUnavailable as exc:
            # It stays kept, for the next recovery; the others are sent now.
            self._unavailable.append(str(exc))
            job = job_of(result.path) if result.path is not None else None
            if job is not None:
                self.unavailable_keys.append(job[0])
            return
        except OSError as exc:
            logger.warning("a kept result is lost: %s", exc)
            job = job_of(result.path) if result.path is not None else None
            if job is not None:  # it ran: its client must not take it for unrun
                self._write(
                    JobResults(comp_id=self.comp_id, results=[lost_entry(*job)])
                )
                await self._drained()
            return
        if entry and entry[0] in (FILE, PROVISIONAL):
            await self._send_sent(entry, buffers)
            return
        size = sum(b.nbytes for b in buffers) + entry_text_bytes(entry)
        if size < self.stream_bytes:
            self._write(JobResults(comp_id=self.comp_id, results=[entry]), buffers)
            await self._drained()
            return
        # Its buffers, and its output if large, in chunks; then its entry.
        streamed, chunks = split_entry(
            self.comp_id, entry, buffers, kinds, self.chunk_bytes
        )
        for chunk, part in chunks:
            self._write(chunk, [part])
            await self._drained()
        self._write(JobResults(comp_id=self.comp_id, results=[streamed]))
        await self._drained()

    async def _send_sent(self, entry: list[Any], buffers: list[memoryview]) -> None:
        """A kept file a job sent, or a provisional result: in one message (neither
        is cut in parts), left out (logged) if over the client's limit."""
        what, key, detail = entry[:3]
        message: Any = (
            FileFromNode(comp_id=self.comp_id, key=key, path=detail)
            if what == FILE
            else JobProvisional(comp_id=self.comp_id, key=key, attempt=detail)
        )
        size = sum(b.nbytes for b in buffers)
        if size + _HEADER_ROOM > self.max_message_size:
            logger.warning(
                "%s of job %s (%d bytes) not sent to the recovering client: over its "
                "max_message_size",
                "file" if what == FILE else "provisional result",
                key,
                size,
            )
            return
        self._write(message, buffers)
        await self._drained()

    def _write(self, message: Any, buffers: list[memoryview] | None = None) -> None:
        self.conn.write(message, buffers or ())

    async def _drained(self) -> None:
        """Back-pressure: wait while the socket has not taken a chunk's worth."""
        if self.conn.unsent > self.chunk_bytes:
            await self.conn.flush()


async def _in_thread(kept: Kept, result: KeptResult) -> Any:
    """``kept.open(result)`` in a thread; `KeptUnavailable` if none can be had (the
    node short of memory: the result is not lost). Cancelled, it returns once the
    thread has ended, its copy let go: a recovery that ends another waits for it
    (one copy at a time)."""
    opening = asyncio.ensure_future(asyncio.to_thread(kept.open, result))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        await asyncio.wait([opening])
        if not opening.cancelled():
            opening.exception()  # (retrieved: it is dropped, as its result)
        raise
    except RuntimeError as exc:  # "can't start new thread"
        raise KeptUnavailable(
            f"the node cannot read the results it kept now ({exc}); they stay kept: "
            "call recover_jobs again later"
        ) from None
