"""What the scheduler writes to one client: its session's outgoing side.

Results read together from the nodes go to the client joined, one message per
computation (`_ToClient.gather`); a client that does not take what is sent to it
gets what follows from a backlog, on disk past --kept_memory, as it reads again
(`_ToClient.check_backlog`); a session that ends says why last, and closes once its
client took it (`_ToClient.say_last`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from dispynb.errors import DispynbError
from dispynb.protocol.framing import Frame
from dispynb.protocol.messages import JobResults, Message
from dispynb.transport.connection import Connection
from schedserver.spill import KeptMessages

if TYPE_CHECKING:
    from schedserver.server import SchedulerServer

#: The session's logger (its log lines keep the name they had there).
logger = logging.getLogger("schedserver.session")

#: Results whose buffers make this many bytes go to the client without waiting for
#: the node's next ones (gathering is for bursts of small results).
GATHER_BYTES = 256 * 1024

#: What joining a results message to others may add to its size: a computation id
#: renumbered for the client, longer lists (their length prefixes) and, per job
#: start, a larger index of the result it follows. Each message joined also drops
#: its own prefix, lengths and MAC (over 40 bytes), so the joined message is at most
#: the sum of its parts' sizes plus this.
_JOIN_SLACK = 16
_START_GROWTH = 4

#: Bytes written to a client that its socket has not taken, past which what follows
#: waits in a backlog (`check_backlog`): in memory within --kept_memory with what
#: is kept for clients that went away, on disk past it, --max_kept bytes at most.
SEND_HIGH = 32 * 1024 * 1024

#: While the backlog goes out, it is read back while fewer bytes than this wait for
#: the client's socket.
BACKLOG_UNSENT = 8 * 1024 * 1024

#: Pulses (--pulse_interval: a minute by default; --zombie_interval at most) that
#: an ended session waits for its client to take why it ended (`say_last`): a
#: client stopped a while hears it as it runs again. Before, it waited up to
#: --zombie_interval (an hour), holding what its socket had not taken (32 MiB
#: each): a client stopped for good, or many revoked at once, held it all.
ENDING_PULSES = 60


class _ToClient:
    """`SchedulerSession`'s part that writes to its client."""

    # Set by `SchedulerSession.__init__` (see there).
    conn: Connection
    server: SchedulerServer
    user: str
    ending: bool
    backlog: KeptMessages | None
    _gathered: dict[int, list[Any]]
    _gathered_bytes: int
    _gathered_size: int
    _gather_limit: int
    _send_due: bool
    _backlogged_before: bool
    _backlog_task: asyncio.Task[None] | None

    def send(
        self,
        message: Message,
        buffers: list[memoryview] | None = None,
        size: int | None = None,
        limit: int = 0,
    ) -> None:
        """Write to the client (a connection that ended is handled by `serve`).

        Results whose ``size`` is known (as `gather` takes them) join what was
        gathered if the client takes the joined message (``limit``)."""
        if self.ending:
            return  # its last word was said (`end`)
        if self.backlog is not None:
            self.send_gathered()
            self.backlog.add(message, buffers or [])
            return
        if self._gathered:
            if isinstance(message, JobResults) and size is not None:
                self.gather(message, buffers or [], size, limit)
                self.send_gathered()
                return
            self.send_gathered()  # what was gathered goes first: the order is kept
        with contextlib.suppress(DispynbError):
            self.conn.write(message, buffers or ())

    @property
    def gathering(self) -> bool:
        """Results are held (`gather`): they go before anything else."""
        return bool(self._gathered)

    def relay(
        self,
        frame: Frame,
        message: Message,
        buffers: list[memoryview],
        size: int | None = None,
        limit: int = 0,
    ) -> None:
        """`send` ``message``, whose ``frame`` (as a node sent it) is passed on as
        it came, unless what was gathered must go first."""
        if self._gathered or self.backlog is not None or self.ending:
            self.send(message, buffers, size, limit)
            return
        with contextlib.suppress(DispynbError):
            self.conn.relay(frame)

    def gather(
        self, message: JobResults, buffers: list[memoryview], size: int, limit: int
    ) -> None:
        """Hold ``message`` to join it with the results that follow: a node's
        messages read together (a burst of short jobs) reach the client as one
        message per computation, written by `send_gathered`, in one system call.

        ``size``: the message's as a node sent it (`Connection.last_size`: the
        client counts the same bytes); ``limit``: the largest message its client
        takes (``max_message_size``). What was gathered goes first if the joined
        message could pass the limit of any client computation it holds results
        of. (A node cuts its messages to that limit; one that is larger anyway goes
        alone, as it would without gathering.)

        The caller calls `send_gathered` once it handled them (nothing waits for a
        timer); any other message to the client sends what was gathered first.
        """
        if self.backlog is not None or self.ending:
            self.send(message, buffers)
            return
        size += _JOIN_SLACK + _START_GROWTH * len(message.started)
        if self._gathered:
            if self._gathered_size + size > min(limit, self._gather_limit):
                self.send_gathered()
            else:
                limit = min(limit, self._gather_limit)
        self._gathered_size += size
        self._gather_limit = limit
        held = self._gathered.get(message.comp_id)
        if held is None:
            self._gathered[message.comp_id] = [
                list(message.results),
                list(message.started),
                list(buffers),
            ]
        else:
            results, started, held_buffers = held
            # A start's ``before`` counts the results of its message before it.
            earlier = len(results)
            started.extend([*s[:3], s[3] + earlier] for s in message.started)
            results.extend(message.results)
            held_buffers.extend(buffers)
        self._gathered_bytes += sum(b.nbytes for b in buffers)
        if self._gathered_bytes >= GATHER_BYTES:
            self.send_gathered()  # large results are not worth holding

    def send_gathered_soon(self) -> None:
        """`send_gathered` at the loop's next turn at the latest (the node's
        messages read with the last results may hold none: nothing stays held)."""
        if self._gathered and not self._send_due:
            self._send_due = True
            asyncio.get_running_loop().call_soon(self.send_gathered)

    def send_gathered(self) -> None:
        """Send the results `gather` holds (one message per computation)."""
        self._send_due = False
        if not self._gathered:
            return
        self._gathered_bytes = self._gathered_size = 0
        gathered, self._gathered = self._gathered, {}
        messages = [
            (JobResults(comp_id=comp_id, results=results, started=started), buffers)
            for comp_id, (results, started, buffers) in gathered.items()
        ]
        if self.backlog is not None:
            for message, buffers in messages:
                self.backlog.add(message, buffers)
        elif messages:
            with contextlib.suppress(DispynbError):
                self.conn.write_many(messages)

    def check_backlog(self) -> None:
        """Past `SEND_HIGH` bytes the client's socket has not taken, what is
        sent to the client waits in a backlog (on disk past --kept_memory) until
        it has taken them: a client that does not read its results grows neither
        the scheduler's memory nor holds its CPUs (its jobs end, and the CPUs go
        on). Past --max_kept bytes waiting, its results become errors naming the
        option and it gets no CPUs until it reads."""
        if self.backlog is not None or self.conn.unsent <= SEND_HIGH:
            return
        self.backlog = KeptMessages(
            self.server.spill,
            f"user {self.user!r}",
            self.server.config.max_kept,
            whose="a client that does not read what is sent to it",
            user=self.user,
        )
        (logger.debug if self._backlogged_before else logger.warning)(
            "user %r (%s) does not read what is sent to it (%.0f MiB wait): what "
            "follows waits for it, on disk past --kept_memory",
            self.user,
            self.conn.peer,
            self.conn.unsent / 2**20,
        )
        self._backlogged_before = True
        self._backlog_task = self.server._spawn(self._send_backlog())

    async def _send_backlog(self) -> None:
        """Send the backlog, oldest first, as the client takes it."""
        backlog = self.backlog
        assert backlog is not None
        try:
            await self.conn.flush()
            while len(backlog):
                message, buffers = backlog.pop()
                self.conn.write(message, buffers)
                if self.conn.unsent > BACKLOG_UNSENT:
                    await self.conn.flush()
        except DispynbError:
            backlog.clear()  # the client went away: as what it was sent
        except OSError as exc:
            logger.error("user %r: cannot read back its backlog: %s", self.user, exc)
            backlog.clear()
        self.backlog = None
        # Its computations may have CPUs again (`SharedComputation.held`), also
        # where ``backlog.full`` no longer says they were held: a hold of its
        # user's --max_user_kept lifts unseen as the backlog goes out.
        self.server.schedule()

    def say_last(self, message: Message) -> None:
        """Tell the client why its session ends (a revoked user, a silent client):
        ``message`` goes after what its socket was given already, not behind a
        backlog (dropped: nothing more is sent), and `end` closes the connection
        once the client has taken it. Closed at once, what the client had not
        taken was dropped: a client stopped (SIGSTOP, a paused VM) with its socket
        full, continued, took the scheduler for lost instead of hearing why its
        jobs ended. From now on nothing more goes to the client, and what it
        sends is ignored."""
        if self.ending:
            return
        self.send(message)  # after the results gathered (or into the backlog)
        backlog, self.backlog = self.backlog, None
        if backlog is not None:
            backlog.clear()  # `_send_backlog` stops
            with contextlib.suppress(DispynbError):
                self.conn.write(message)
        self.ending = True

    def end(self) -> None:
        """End the session: at once, or, once its client was told why
        (`say_last`), as soon as it has taken that (within `ENDING_PULSES`)."""
        if not self.ending or self.conn.closed:
            self.conn.close()
            return
        self.server._spawn(self._close_once_sent())

    async def _close_once_sent(self) -> None:
        config = self.server.config
        grace = min(config.zombie_interval, ENDING_PULSES * config.pulse_interval)
        with contextlib.suppress(DispynbError, TimeoutError):
            async with asyncio.timeout(grace):
                await self.conn.flush()
        self.conn.close()
