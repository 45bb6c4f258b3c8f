"""`SchedulerSession`: one client connection to the scheduler (one user).

It speaks the node protocol: the client cannot tell the scheduler from a node
server with many CPUs. Every message names a computation of this session; one of
another session (another user's, or a made-up id) is refused with an error, so a
user can neither see nor cancel another's jobs. What it writes to its client
(results gathered, a backlog, its last word) is `schedserver.toclient`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from dispynb.defaults import MAX_DEST_PATH_PARTS, PULSE_RANGE
from dispynb.protocol.files import bad_dest_path
from dispynb.protocol.handshake import peer_text
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationFailed,
    ComputationSetup,
    Error,
    FilePlace,
    FilePut,
    FileRelease,
    FileSaved,
    JobCancel,
    JobSubmit,
    Message,
    NodeManage,
    NodeManaged,
    NodeStatus,
    Ping,
    Recover,
    ResultsJournaled,
)
from dispynb.transport.connection import Connection
from dispynb.transport.inbox import BadMessageError
from dispynb.wording import counted
from schedserver.computation import args_room, setup_size
from schedserver.nodelimits import malformed_file_entry
from schedserver.spill import KeptMessages
from schedserver.toclient import SEND_HIGH, _ToClient

if TYPE_CHECKING:
    from schedserver.computation import SharedComputation
    from schedserver.server import SchedulerServer

logger = logging.getLogger(__name__)

#: Bytes written to a client that its socket has not taken, past which its
#: messages wait unread until it has taken them (`serve`): most are answered (a
#: refusal, a node's use...), and a client that sent without reading grew the
#: scheduler by the answers, 560 bytes a message, without bound. (Past it, results
#: go to a backlog: `_ToClient.check_backlog`.)
READ_HOLD = SEND_HIGH


#: Jobs a client's `ResultsJournaled` may name beyond those kept for it. A client
#: never needs it: every result sent to a client that acknowledges is kept, and
#: counted, until it names it, so one naming all it was sent at once is within the
#: count (tests/sharedsched/test_acks_bound.py); it is a margin.
ACKS_SLACK = 1024

#: The largest header of a client's message the scheduler decodes: decoding holds
#: its loop (about 2 s for 16 MiB) and the header's objects take up to 64 times its
#: bytes. A job takes about 8 bytes of a `JobSubmit`'s (100 more per file of its
#: own): 16 MiB is over a hundred times the jobs a client sends at once to 1,000
#: CPUs. Arguments, files and results travel in payload buffers, not capped so.
CLIENT_MAX_HEADER = 16 * 1024 * 1024


class SchedulerSession(_ToClient):
    """A client's connection: its computations, by the client's ids."""

    def __init__(self, conn: Connection, server: SchedulerServer, user: str) -> None:
        conn.max_header = CLIENT_MAX_HEADER  # one user's message cannot fill memory
        self.conn = conn
        self.server = server
        self.user = user
        #: The token its client proved (set as it is served): once the users file
        #: has another (or none), the session ends as a revoked user's.
        self.token: bytes | None = None
        self.computations: dict[int, SharedComputation] = {}
        loop = asyncio.get_running_loop()
        # The default loop's clock is `time.monotonic` itself: one call less for
        # each of the client's messages.
        default = type(loop).time is asyncio.BaseEventLoop.time
        self._clock = time.monotonic if default else loop.time
        self.last_heard = self._clock()
        self._status_every = server.config.pulse_interval
        self._last_status = 0.0
        #: Results gathered per computation id: ``[results, started, buffers]``.
        self._gathered: dict[int, list[Any]] = {}
        self._gathered_bytes = 0  # of their buffers
        #: At least the size of the messages `send_gathered` would write, and the
        #: largest message their client takes (see `gather`).
        self._gathered_size = 0
        self._gather_limit = 0
        self._send_due = False  # a `send_gathered` is due at the loop's next turn
        #: What waits for a client that does not take what was sent to it (None:
        #: nothing waits), in order; it was logged once already.
        self.backlog: KeptMessages | None = None
        #: A file it sent was refused (logged once: not each of them).
        self._files_refused = False
        #: A computation over its user's quota was refused (logged once).
        self._computations_refused = False
        #: An exclusive computation of its user was declined (logged once).
        self._exclusive_declined = False
        self._backlogged_before = False
        #: The task sending the backlog out (`_send_backlog`), while there is one.
        self._backlog_task: asyncio.Task[None] | None = None
        #: Its end was said (`end`): the connection closes once the client took it.
        self.ending = False
        #: The longest pulse its client asked for (0: none asked): it pings at
        #: least every half of it.
        self.client_pulse = 0.0
        #: Its exclusive computations that let other users' jobs run while it is
        #: silent (`_Pulse._watch_exclusive`), and when it was last heard before.
        self.exclusive_paused: list[SharedComputation] = []
        self.paused_since = 0.0
        #: Its messages wait unread until it has taken what was sent to it
        #: (`serve`); and what it had taken at the last pulse (`heard_as_it_reads`).
        self.reads_held = False
        self._taken_seen = 0

    async def serve(self) -> None:
        """Handle the client's messages until its connection ends; while it has
        not taken `READ_HOLD` bytes sent to it, what it sends waits unread (in its
        socket, then its own), so that the answers to what it sends cannot pile
        up here."""
        while True:
            await self.conn.dispatch(self._on_message, self._on_bad)
            self.reads_held = True
            try:
                await self._taken()
            finally:
                self.reads_held = False

    def _unread(self) -> bool:
        """What was sent to the client waits for it: `READ_HOLD` bytes in its
        socket, or a backlog (`check_backlog`) with no room left, its own
        (--max_kept) or its user's (--max_user_kept): the answers to its messages
        would go there, and on to the disk (answers are kept past the quota, which
        turns only results into errors). Held at its own quota only, one user's
        sessions kept --max_kept of refusals each."""
        backlog = self.backlog
        return self.conn.unread(READ_HOLD) or (
            backlog is not None
            and (backlog.size >= backlog.quota or backlog.user_room() <= 0)
        )

    async def _taken(self) -> None:
        """Wait until the client took what was sent to it (`_unread`); raises
        `ConnectionClosedError` once its connection ended."""
        while self._unread():
            task = self._backlog_task
            if not self.conn.unread(READ_HOLD) and task is not None:
                await asyncio.wait([task])  # (it ends with the connection too)
            else:
                await self.conn.flush()

    def heard_as_it_reads(self) -> None:
        """A client whose messages wait unread (`serve`: its pings too) is alive
        while it takes what is sent to it: on a slow link, catching up on 32 MiB
        took longer than --zombie_interval, and a client that pinged all along was
        taken for a zombie, its jobs ended. One that takes nothing more (stopped,
        cut off) stays silent: the pings that wait in its socket are old."""
        conn = self.conn
        taken = conn.bytes_sent - conn.unsent - conn.untaken_bytes()
        if self.reads_held and taken > self._taken_seen:
            self.last_heard = self._clock()
        self._taken_seen = taken

    @property
    def status_every(self) -> float:
        """Seconds between the reports this client needs (its pulse, at most the
        scheduler's)."""
        return self._status_every

    def report(self, avail: list[float | None]) -> None:
        """Status for the client, at its computations' pulse (a node's heartbeat)."""
        now = asyncio.get_running_loop().time()
        if self.backlog is not None:
            return  # a heartbeat: the next one goes once it reads again
        if now - self._last_status >= self._status_every * 0.9:
            self._last_status = now
            self.send(NodeStatus(avail=avail))

    def _pulse_at(self, interval: float | None) -> None:
        """The client asked for a status report every ``interval`` s (None or 0:
        not asked): reports come at the shortest pulse its computations asked for."""
        if not isinstance(interval, int | float) or not interval > 0:
            return
        self.client_pulse = max(self.client_pulse, min(interval, PULSE_RANGE[1]))
        every = min(self._status_every, max(PULSE_RANGE[0], interval))
        if every < self._status_every:
            self._status_every = every
            self.server.pulse_changed()

    def _refuse(self, text: str) -> None:
        self._log_refusal(text)
        self.send(Error(code="refused", message=text))

    def _log_refusal(self, text: str) -> None:
        """Log that a message of the user was refused, as a count past the first
        (a line each let any user grow the scheduler's log at will)."""
        self.server.message_refusals.event(
            "refused messages", f"user {self.user!r}", text
        )

    def _on_bad(self, error: BadMessageError) -> None:
        text = f"message not understood: {peer_text(error)}"
        if self._unread():  # (not answered: what it was sent waits for it)
            self._log_refusal(text)  # counted, as a dispatch goes on for these
        else:
            self._refuse(text)

    def _comp(self, comp_id: int) -> SharedComputation | None:
        comp = self.computations.get(comp_id)
        if comp is None:
            self._refuse(self._not_own(comp_id))
        return comp

    def _not_own(self, comp_id: int) -> str:
        return (
            f"no computation {comp_id} of user {self.user!r} here: a session can "
            "only address its own computations"
        )

    def _over_computations(self) -> str:
        """Why one more computation of this user is refused ("" if it is not):
        each holds a connection and worker processes on every node."""
        quota = self.server.config.max_computations
        if not quota:
            return ""
        have = sum(
            1 for c in self.server.computations if c.user == self.user and not c.closed
        )
        if have < quota:
            return ""
        return (
            f"refused: user {self.user!r} has {counted(have, 'computation')} at the "
            "scheduler, "
            f"its quota (dispynb-scheduler --max_computations {quota}); close one "
            "first"
        )

    def _exclusive(self, setup: ComputationSetup) -> ComputationSetup:
        """``setup`` (exclusive) as it runs: exclusive if its user may (logged:
        every other user's jobs wait), otherwise shared, its client told why and
        whom to ask (`FairShare.exclusive_refusal`)."""
        name = f"{self.user}/{peer_text(setup.name, 200)}"
        refused = self.server.fair.exclusive_refusal(self.user)
        if not refused:
            logger.info(
                "%s runs exclusive: no other user's job starts until it closes", name
            )
            return setup
        (logger.debug if self._exclusive_declined else logger.info)(
            "%s: exclusive=True declined (user %r is not among --exclusive_users): "
            "it runs shared",
            name,
            self.user,
        )
        self._exclusive_declined = True
        self.send(Error(code="refused", message=refused))
        return dataclasses.replace(setup, exclusive=False)

    def _setup_too_large(
        self, setup: ComputationSetup, bundle: list[memoryview]
    ) -> str:
        """Why a computation is refused ("" if it is not): its ``bundle`` (its
        functions) and the files ``setup`` lists, kept here while it lives, are
        over what its user may hold here."""
        size = setup_size(setup, bundle)
        if size <= args_room(self.server, self.user):
            return ""
        quota = self.server.config.max_user_args
        what, fix = "its functions and setup", "send large data as a file in depends"
        if setup.files:
            what = f"{what}, listing {len(setup.files)} files,"
            fix = f"{fix} (many files as one archive)"
        return (
            f"refused: {what} take {size >> 20} MiB, and user {self.user!r} may "
            f"have {quota >> 20} MiB of computations and jobs' arguments at the "
            "scheduler at once (its dispynb-scheduler --max_user_args quota); "
            f"{fix}, close other clusters, or have it raised"
        )

    def _files_too_large(self, setup: ComputationSetup) -> str:
        """Why the files ``setup`` depends on are refused ("" if they are not)."""
        for entry in setup.files:
            malformed = malformed_file_entry(entry)
            if malformed:
                return malformed
            path, size = entry[0], entry[2]
            refused = self.server.files.too_large(size, f"file {path!r}")
            if refused:
                return refused
        return ""

    def _on_journaled(self, message: ResultsJournaled) -> None:
        """The client journaled these results of its computation: what was kept
        of them for its recovery goes (only its own computation's; nothing if it
        did not ask for acknowledgements, which it was then not offered). It names
        at most the jobs kept for it (and `ACKS_SLACK` more): checking a longer
        list would hold the loop for nothing."""
        jobs = message.jobs
        if not isinstance(jobs, list):
            self._refuse("malformed jobs in results-journaled")
            return
        comp = self._comp(message.comp_id)
        if comp is None or not comp.kept.tracking:
            return
        most = comp.kept.tracked + ACKS_SLACK
        if len(jobs) > most:
            self._refuse(
                f"results-journaled names {len(jobs)} jobs; computation "
                f"{message.comp_id} has {comp.kept.tracked} kept: at most {most} "
                "at once (a client names only results it was sent, each kept until "
                "it names it); refused, nothing dropped"
            )
            return
        if not all(
            isinstance(job, list)
            and len(job) == 2
            and all(type(part) is int for part in job)
            for job in jobs
        ):
            self._refuse("malformed jobs in results-journaled")
            return
        held = comp.kept.full
        dropped = comp.kept.journaled(jobs)
        account = comp.kept.account
        if held and not comp.kept.full:
            self.server.schedule()  # back under its quota: CPUs for it again
        elif dropped and account is not None and account.holding:
            # Room freed in its user's --max_user_kept, where another of her
            # computations (its client away) or sessions is held: it may run
            # again (`KeptMessages.full` says so, and flags those still held).
            account.holding = False
            self.server.schedule()

    def _on_message(self, message: Message, buffers: list[memoryview]) -> bool:
        """Handle a message of the client; True once what was sent to it waits
        unread past `READ_HOLD` (`serve` then reads no more until it is taken)."""
        self._handle(message, buffers)
        return self._unread()

    def _handle(self, message: Message, buffers: list[memoryview]) -> None:
        if self.ending:
            return  # told why it ends (`end`): nothing of it is served
        self.last_heard = self._clock()
        server = self.server
        if isinstance(message, JobSubmit):
            malformed = _malformed_submit(message, len(buffers))
            if malformed:
                self._refuse(f"{malformed} in job-submit; its jobs refused")
                return
            comp = self._comp(message.comp_id)
            if comp is not None and not comp.closing:
                comp.submit(message, buffers, self.conn.last_frame)
                server.schedule()
                comp.submitted()
        elif isinstance(message, Ping):
            pass
        elif isinstance(message, JobCancel):
            comp = self._comp(message.comp_id)
            if comp is not None:
                comp.cancel(message)
        elif isinstance(message, FilePut):
            refused = server.file_put(self, message, buffers)
            if refused and self._files_refused:
                self.send(Error(code="refused", message=refused))  # logged once
            elif refused:
                self._files_refused = True
                self._refuse(refused)
        elif isinstance(message, ComputationSetup):
            if message.comp_id in self.computations:
                self._refuse(f"computation {message.comp_id} exists already")
            elif refused := self._over_computations():
                (logger.debug if self._computations_refused else logger.warning)(
                    "user %r: %s", self.user, refused
                )
                self._computations_refused = True
                self.send(ComputationFailed(comp_id=message.comp_id, message=refused))
            elif refused := (
                message.bad_seconds()
                or bad_dest_path(message.dest_path, MAX_DEST_PATH_PARTS)
                or self._files_too_large(message)
                or self._setup_too_large(message, buffers)
            ):
                self._log_refusal(refused)
                self.send(ComputationFailed(comp_id=message.comp_id, message=refused))
            else:
                self._pulse_at(message.pulse_interval)
                asked = bool(message.exclusive)
                if asked:
                    message = self._exclusive(message)
                if isinstance(message.dest_path, str) and message.dest_path.strip("/."):
                    # A node keeps a dest_path under its client's address, shared
                    # by that client's computations (as dispy's): here, under each
                    # user's name, so that users' files do not meet.
                    message = dataclasses.replace(
                        message, dest_path=f"{self.user}/{message.dest_path}"
                    )
                comp = server.new_computation(self, message, buffers)
                comp.exclusive_declined = asked and not message.exclusive
                self.computations[message.comp_id] = comp
        elif isinstance(message, ComputationClose):
            comp = self._comp(message.comp_id)
            if comp is not None and not comp.closing:
                if comp.recovering and message.terminate:  # recover_jobs' terminate
                    comp.terminate_jobs()
                else:
                    comp.close(message)
        elif isinstance(message, FileRelease):
            digests = message.digests
            if not isinstance(digests, list) or not all(
                isinstance(d, str) for d in digests
            ):
                self._refuse("malformed digests in file-release")
            else:
                server.file_release(self, digests)
        elif isinstance(message, FilePlace):
            comp = self._comp(message.comp_id)
            if comp is not None:
                server.file_place(comp, message)
        elif isinstance(message, FileSaved):
            comp = self._comp(message.comp_id)
            if comp is not None:
                comp.file_saved(message)
        elif isinstance(message, Recover):
            self._pulse_at(message.pulse_interval)  # its sign of life while it waits
            server.recover(self, message)
        elif isinstance(message, ResultsJournaled):
            self._on_journaled(message)
        elif isinstance(message, NodeManage):
            # Answered once, with `NodeManaged` (its error says why, as `_comp`'s
            # refusal would: that refusal as well made two answers to one request).
            comp = self.computations.get(message.comp_id)
            if comp is None:
                error, cpus = self._not_own(message.comp_id), 0
                self._log_refusal(error)
            elif comp.closing:
                error, cpus = f"computation {message.comp_id} is closing", 0
            else:
                error, cpus = comp.manage(message)
            self.send(
                NodeManaged(
                    comp_id=message.comp_id,
                    request=message.request,
                    error=error,
                    cpus=cpus,
                )
            )
            if not error:
                server.schedule()  # (allocated: its jobs may go there now)
        else:
            self._refuse(f"unexpected {message.op!r} from a client")


def _malformed_submit(message: JobSubmit, buffers: int) -> str:
    """What is malformed in a client's job-submit ("" if nothing): its entries are
    used here before a node checks them (a limit whose key was a map ended the
    session with a KeyError, logged as an error)."""
    total = 0
    for item in message.jobs:
        if (
            not isinstance(item, list)
            or len(item) not in (3, 4)
            or not all(type(part) is int for part in item[:3])
            or item[2] < 1
        ):
            return "a malformed job entry"
        if len(item) == 4 and not _own_files(item[3]):
            return "a malformed list of a job's own files"
        total += item[2]
    if total > buffers:
        return "job entries counting more buffers than it carries"
    for limit in message.limits:
        if (
            not isinstance(limit, list)
            or len(limit) != 3
            or type(limit[0]) is not int
            or not all(_number(part) for part in limit[1:])
        ):
            return "a malformed job limit"
    for pin in message.pins:
        if (
            not isinstance(pin, list)
            or len(pin) != 2
            or type(pin[0]) is not int
            or not isinstance(pin[1], str)
        ):
            return "a malformed job pin"
    return ""


def _own_files(files: Any) -> bool:
    """Whether a job entry's fourth item is its own files as a client lists them:
    ``[path, digest]`` each, ``True`` after them for a program (held while the
    job waits: an entry of another shape, 200,000 empty lists say, held 11 MiB)."""
    return isinstance(files, list) and all(
        isinstance(entry, list)
        and len(entry) in (2, 3)
        and isinstance(entry[0], str)
        and isinstance(entry[1], str)
        and (len(entry) == 2 or type(entry[2]) is bool)
        for entry in files
    )


def _number(value: Any) -> bool:
    """A job limit's value: None (no limit) or a number."""
    return value is None or type(value) in (int, float)


__all__ = ["SchedulerSession"]
