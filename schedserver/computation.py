"""`SharedComputation`: one client's computation as the scheduler relays it.

It holds the client's jobs until `fairshare` gives them a CPU, and one `Upstream`
connection per node where it is set up (the scheduler connects to each node as a
client, with the node secret). What the nodes send back (results, output,
provisional results, files) goes to the client's session unchanged, with the
client's computation id; while the client is away (with a recovery id) it is kept,
for `Recover`. Its node side (jobs out, results in, nodes lost) is
`schedserver.nodeside`; its client's management of its nodes (``close_node``,
``allocate_node``...) is `schedserver.nodeuse`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispynb.defaults import MAX_MESSAGE_SIZE
from dispynb.protocol.chunks import fit_message
from dispynb.protocol.fileuses import FileUses
from dispynb.protocol.framing import Frame
from dispynb.protocol.handshake import peer_text
from dispynb.protocol.messages import (
    ABANDONED,
    CANCELLED,
    ComputationClose,
    ComputationSetup,
    FileFromNode,
    JobCancel,
    JobProvisional,
    JobResults,
    JobsPlaced,
    JobSubmit,
    Message,
    ResultChunk,
)
from dispynb.protocol.records import ResultEntry
from dispynb.transport.connection import Connection
from dispynb.wording import counted
from schedserver.fairshare import Account
from schedserver.jobfiles import job_size
from schedserver.jobqueue import JobQueue
from schedserver.nodeside import _NodeSide
from schedserver.nodeuse import _NodeUse
from schedserver.sentfiles import _SentFiles
from schedserver.spill import KeptMessages

if TYPE_CHECKING:
    from schedserver.server import NodeState, SchedulerServer
    from schedserver.session import SchedulerSession

logger = logging.getLogger(__name__)

#: Messages kept for a client that went away: what recovery resends (where jobs
#: went too: a recovered job names the node that ran it).
_KEPT_KINDS = (JobResults, ResultChunk, JobProvisional, FileFromNode, JobsPlaced)

#: Room for a message's header (a file's path at most a few KiB), lengths and MAC.
_HEADER_ROOM = 64 * 1024

#: Bytes each buffer held here counts besides its bytes (its view object and its
#: place in a list): a message may carry 65,536 buffers, 4 bytes each on the wire
#: when empty, and a job of that many held 12 MiB here, counted as 512 bytes.
BUFFER_COST = 192


def held_size(buffers: list[memoryview]) -> int:
    """What ``buffers`` count against --max_user_args: their bytes, and
    `BUFFER_COST` each."""
    return sum(b.nbytes for b in buffers) + BUFFER_COST * len(buffers)


#: Bytes each file a computation's setup lists (``depends``) counts against
#: --max_user_args besides its path and digest: its entry's objects and its claim
#: on the file, about 900 bytes. A setup listing 200,000 files (15 MiB sent) held
#: 180 MiB here while it waited for them, counted as nothing.
FILE_ENTRY_COST = 1024


def setup_size(setup: ComputationSetup, bundle: list[memoryview]) -> int:
    """What a computation counts against --max_user_args while it lives: its
    functions (``bundle``), the files its setup lists (entries checked already:
    ``[path, digest, size, ...]``) and its setup's texts (a name of 15 MiB was
    held, counted as nothing)."""
    texts = (setup.name, setup.dest_path, setup.recovery_id, setup.python)
    return (
        held_size(bundle)
        + sum(len(text) for text in texts if text)
        + sum(FILE_ENTRY_COST + len(entry[0]) + len(entry[1]) for entry in setup.files)
    )


def args_room(server: SchedulerServer, user: str) -> float:
    """Bytes more ``user``'s computations may hold in the scheduler's memory (their
    bundles and their jobs' arguments: --max_user_args)."""
    quota = server.config.max_user_args
    if not quota:
        return math.inf
    return quota - sum(c.held_bytes for c in server.computations if c.user == user)


@dataclass(slots=True, eq=False)
class JobBatch:
    """The jobs of one client message: their arguments are views of its one body,
    which stays in memory while any of them is held here, so it counts against
    --max_user_args whole (``size``) while ``jobs`` of them are held."""

    size: int
    jobs: int = 0


@dataclass(slots=True, eq=False)
class QueuedJob:
    """A client's job as it arrived: its wire item and its argument buffers."""

    key: int
    attempt: int
    item: list[Any]
    buffers: list[memoryview]
    limits: list[Any] | None = None
    node: str = ""  # where it runs ("" while queued here)
    started: bool = False  # the node reported it executing
    start_time: float = 0.0  # when, as the node said (with ``started``)
    pin: str = ""  # the only node it may run on (``submit_node``; "": any)
    cancelled: bool = False  # its client cancelled it where it was sent
    #: The message it came in (what it counts against --max_user_args).
    batch: JobBatch | None = None


@dataclass(eq=False)
class Upstream:
    """The computation's connection to one node."""

    node: NodeState
    conn: Connection | None = None
    ready: bool = False
    closed: bool = False
    #: Its client closed it there (``close_node``, or its allocate() declined):
    #: no longer in its client's reports, while the node closes it.
    closing: bool = False
    #: Its connection ended (or never came): the node is lost to the computation.
    ended: bool = False
    #: The results being read went to the client already (`SharedComputation.pass_on`).
    passed: bool = False
    #: The node reported on it (`NodeStatus`, every pulse from its setup on): the
    #: pulse watchdog judges the node by it from then on, also while it sets up.
    reporting: bool = False
    task: asyncio.Task[None] | None = None
    #: Why the scheduler ended it ("": it did not): what it would have sent is
    #: over what the node takes (`schedserver.nodelimits`).
    refused: str = ""
    #: Digests of the jobs' own files written on this connection (`send_jobs`),
    #: and how many jobs sent on it, not ended yet, need each (`_job_files_ended`).
    files_sent: set[str] = dataclasses.field(default_factory=set)
    file_uses: FileUses = dataclasses.field(default_factory=FileUses)


def acks_journaled(setup: ComputationSetup) -> bool:
    """Whether the scheduler takes `ResultsJournaled` for this computation: it
    keeps every result for its client's recovery, and the client asked to say
    which it journaled (an older client never asks, and is never offered it)."""
    return bool(setup.recovery_id) and setup.keep_sent and setup.ack_journaled


class SharedComputation(_NodeUse, _NodeSide, _SentFiles):
    """One client computation on the scheduler's nodes."""

    def __init__(
        self,
        server: SchedulerServer,
        session: SchedulerSession,
        setup: ComputationSetup,
        bundle: list[memoryview],
        order: int,
    ) -> None:
        self.server = server
        self.session: SchedulerSession | None = session
        self.user = session.user
        self.setup = setup
        self._name = f"{self.user}/{peer_text(setup.name, 200)}"
        #: Its id towards the nodes (the client's first one), and towards the client.
        self.comp_id = setup.comp_id
        self.client_comp_id = setup.comp_id
        self.bundle = bundle
        self.account = Account(session.user, order, exclusive=setup.exclusive)
        #: Its client asked for it exclusive; its user is not among
        #: --exclusive_users (`SchedulerSession._exclusive`): it runs shared.
        self.exclusive_declined = False
        #: The exclusive computation its client was told its jobs wait for
        #: (`_Dispatch._tell_who_waits`): told once per exclusive computation.
        self.told_waiting: SharedComputation | None = None
        self.queue = JobQueue()
        self.running: dict[int, QueuedJob] = {}
        #: Bytes it holds here against --max_user_args: its bundle (kept to set it
        #: up on nodes that join later) and its jobs' messages (`JobBatch`).
        self.held_bytes = setup_size(setup, bundle)
        #: A job of it was refused over --max_user_args (logged once).
        self._args_refused = False
        self.upstream: dict[str, Upstream] = {}
        #: The wait before it is set up again on a node whose link to it ended while
        #: the node stayed up (`_NodeLinks._relink_later`), doubling each time.
        self.relink_delay: dict[str, float] = {}
        #: Nodes its client closed it on (``close_node``): it is not set up there
        #: again, not even when they come back, until its client names them
        #: (``allocate_node``).
        self.nodes_closed: set[str] = set()
        #: Changes of its nodes' use logged at info level so far (`LOGGED_CHANGES`).
        self._changes_logged = 0
        #: Nodes none of its jobs go to until its client's allocate() answers
        #: (`ComputationSetup.allocates`): lifted if that client goes away first.
        self.awaiting_client: set[str] = set()
        #: Of ``nodes_closed``, those its client's allocate() declined: asked again
        #: when they come back up (`node_back`), as dispy asks a node it finds again.
        self.nodes_declined: set[str] = set()
        #: Nodes its client named (``allocate_node``) after closing them: not held
        #: for its allocate() (its client uses all of them, as dispy's).
        self.nodes_named: set[str] = set()
        #: Nodes said to send messages about jobs they do not run, or to ask for
        #: files its setup does not list (said once each).
        self.foreign_senders: set[str] = set()
        self.ready_sent = False
        self.closing = False
        self.closed = False
        self.failures: list[str] = []
        self.failure_traceback = ""
        #: The client came back for it (`Recover`): it closes once its jobs ended.
        self.recovering = False
        #: Closed on the nodes, its client gone and no job left (`leave_the_nodes`).
        self.released = False
        #: Messages for the client while it is away (or all, to resend: keep_sent).
        self.kept = KeptMessages(
            server.spill, self.name, server.config.max_kept, user=self.user
        )
        # Its client journals every job and says which (`ResultsJournaled`): what
        # it journaled is dropped from what is kept (`KeptMessages.journaled`).
        self.kept.tracking = acks_journaled(setup)
        #: The client came back: what was kept is on its way to it (in order).
        self.replaying = False
        #: The largest message its client takes, when it said so (`Recover`): results
        #: and chunks sized for the client that set it up are cut to it.
        self.client_limit: int | None = None
        self.expiry: asyncio.TimerHandle | None = None
        #: ``send_file`` requests: request -> [names of the nodes yet to answer,
        #: the first error].
        self.placements: dict[int, list[Any]] = {}
        #: Files jobs sent that wait for the client's answer: request -> the node,
        #: the job, the node's number for the file, and whether it was kept for
        #: the client's recovery (keep_sent, within --max_kept).
        self.file_requests: dict[int, tuple[Upstream, int, int, bool]] = {}
        self._file_request_ids = itertools.count(1)
        #: Per node name: [jobs ended there, their run time]; and the node list
        #: last sent to the client (`report_nodes`).
        self.node_done: dict[str, list[float]] = {}
        self._reported: list[list[Any]] | None = None
        #: Why the nodes that left since the last report did (`SchedulerNodes.left`).
        self._left: dict[str, str] = {}
        #: Started jobs requeued since the last report (`SchedulerNodes.requeued`).
        self._requeued: list[int] = []
        #: The client's last job message (`submit`): ``(frame, first job, last job,
        #: jobs)``, while it may still be passed on as it came.
        self._as_sent: tuple[Frame, QueuedJob, QueuedJob, int] | None = None

    @property
    def name(self) -> str:
        """``user/computation`` for log lines (the client's name for it made safe:
        control characters escaped, cut, so that a user cannot forge log lines)."""
        return self._name

    # -- towards the client ------------------------------------------------------------

    def to_client(
        self,
        message: Message,
        buffers: list[memoryview] | None = None,
        gather: bool = False,
        frame: Frame | None = None,
        sent: bool = False,
        size: int | None = None,
        job: tuple[int, int] | None = None,
    ) -> None:
        """Send ``message`` (for this computation) to its client, or keep it;
        ``gather``: results that the session may hold to join with the next ones
        (`SchedulerSession.gather`); ``frame``: ``message`` as a node sent it (its
        connection's `Connection.last_frame`), passed on as it is if nothing in it
        changes for the client; ``sent``: it went already (`pass_on`), it is only
        kept; ``size``: its size as a node sent it (`Connection.last_size`): only
        results of a known size are joined with others, up to the client's
        ``max_message_size``; ``job``: the job ``(key, attempt)`` a message that
        does not name it concerns (`job_file`)."""
        if self.client_comp_id != self.comp_id and hasattr(message, "comp_id"):
            message = dataclasses.replace(message, comp_id=self.client_comp_id)  # type: ignore[type-var]
        session = self.session
        if self.setup.recovery_id is not None and isinstance(message, _KEPT_KINDS):
            if session is None or self.replaying or self.setup.keep_sent:
                # Replaying, its client is back and takes it after what the replay
                # sends before it: no --max_kept for what waits for a client away.
                back = session is not None and self.replaying
                self.kept.add(message, buffers or [], job, within_quota=not back)
            if self.replaying:
                return  # the replay sends it after what was kept before it
        if session is None or sent:
            return
        if self.client_limit is not None:
            for part, part_buffers in self.fitted(message, buffers or []):
                session.send(part, part_buffers)
        elif gather and size is not None and isinstance(message, JobResults):
            session.gather(message, buffers or [], size, self.client_max)
        elif frame is not None and self.client_comp_id == self.comp_id:
            session.relay(frame, message, buffers or [], size, self.client_max)
        else:
            session.send(message, buffers or [], size, self.client_max)

    @property
    def client_max(self) -> int:
        """The largest message the client takes (its ``max_message_size``)."""
        return self.setup.max_message_size or MAX_MESSAGE_SIZE

    def fitted(
        self, message: Message, buffers: list[memoryview]
    ) -> Iterator[tuple[Message, list[memoryview]]]:
        """``message`` cut to the recovering client's limit (`fit_message`). A
        provisional result or a file a job sent over it is left out, logged: no
        message carries them in parts, the client (`recover_jobs`) collects
        results only, and a frame over its limit would lose it every result."""
        limit = self.client_limit or MAX_MESSAGE_SIZE
        if isinstance(message, JobProvisional | FileFromNode):
            size = sum(b.nbytes for b in buffers)
            if size + _HEADER_ROOM > limit:
                what = (
                    f"file {message.path[:200]!r}"
                    if isinstance(message, FileFromNode)
                    else "provisional result"
                )
                reason = (
                    f"{what} of job {message.key} ({size} bytes) not sent: over the "
                    f"max_message_size of {limit} bytes its recovering client gave"
                )
                logger.warning("%s: %s", self.name, reason)
                if isinstance(message, FileFromNode) and message.request:
                    self._answer_request(message.request, reason)  # the job waits
                return
        yield from fit_message(message, buffers, limit)

    @property
    def held(self) -> bool:
        """No CPUs for it: its client is away, or does not read, and it keeps all
        it may already."""
        session = self.session
        if session is not None and session.backlog is not None:
            return session.backlog.full  # its client does not read (`check_backlog`)
        return session is None and self.kept.full

    def _say_what_waits(self) -> None:
        """Log, as its client is away and none of its jobs runs, what waits."""
        kept = self.kept
        logger.info(
            "%s: no job of it runs, %d waiting; %s (%.1f MiB, %.1f MiB of it on "
            "disk) kept for its client",
            self.name,
            len(self.queue),
            counted(len(kept), "message"),
            kept.size / 2**20,
            kept.on_disk / 2**20,
        )

    def end_jobs(self, entries: list[ResultEntry]) -> None:
        """Tell the client that these jobs ended without running (no buffers)."""
        if entries:
            self.to_client(
                JobResults(comp_id=self.comp_id, results=[e.to_wire() for e in entries])
            )

    # -- from the client ---------------------------------------------------------------

    def submit(
        self,
        message: JobSubmit,
        buffers: list[memoryview],
        frame: Frame | None = None,
    ) -> None:
        """Queue the client's jobs (refusing those over the user's quota).

        ``frame``: ``message`` as it came (`Connection.last_frame`); if the jobs go
        to one node in one message before anything else is queued, `send_jobs`
        passes it on as it is instead of encoding the same message again (until
        `submitted`)."""
        limits = (
            {item[0]: item for item in message.limits if item} if message.limits else {}
        )
        pins: dict[int, str] = {key: node for key, node in message.pins}
        was_empty = not self.queue
        with_limits = 0
        refused: list[ResultEntry] = []
        quota = self.server.config.max_queued
        queued = self.server.queued_of(self.user) if quota is not None else 0
        size = sum(job_size(item) for item in message.jobs) + held_size(buffers)
        over = size > self._args_room()
        batch = JobBatch(size)
        offset = 0
        for item in message.jobs:
            key, attempt, count = int(item[0]), int(item[1]), int(item[2])
            job_buffers = buffers[offset : offset + count]
            offset += count
            if over:  # (all of them: their arguments are held in one body)
                refused.append(self._over_args(key, attempt))
                continue
            if quota is not None and queued >= quota:
                refused.append(
                    ResultEntry.unrun(
                        key,
                        attempt,
                        CANCELLED,
                        f"refused: user {self.user!r} may have at most "
                        f"{counted(quota, 'job')} queued at the scheduler (its "
                        "--max_queued quota)",
                    )
                )
                continue
            pin = pins.get(key, "")
            if pin and not self.serves(pin) and not self.set_up_again(pin):
                refused.append(
                    ResultEntry.unrun(
                        key,
                        attempt,
                        ABANDONED,
                        f"node {peer_text(pin, 200)} does not run this computation "
                        "now (it left, or never was one of its nodes): the job was "
                        "pinned to it (submit_node)",
                    )
                )
                continue
            queued += 1
            job_limits = limits.get(key)
            if job_limits is not None:
                with_limits += 1
            job = QueuedJob(
                key, attempt, item, job_buffers, job_limits, pin=pin, batch=batch
            )
            self.queue.append(job)
            self.hold(job)
            self.account.queued += 1
            if pin:
                self.account.pinned[pin] = self.account.pinned.get(pin, 0) + 1
        if refused:
            self.end_jobs(refused)
        if (
            frame is not None
            and was_empty
            and not refused
            and not pins  # (they may go to other nodes than the first ones)
            and self.queue
            and self.client_comp_id == self.comp_id
            # every limit is one of its jobs' (else the node gets those only)
            and with_limits == len(message.limits)
        ):
            self._as_sent = (frame, self.queue[0], self.queue[-1], len(self.queue))

    def hold(self, job: QueuedJob) -> None:
        """``job`` is held here (queued, or running): its message's body counts."""
        batch = job.batch
        if batch is not None:
            batch.jobs += 1
            if batch.jobs == 1:
                self.held_bytes += batch.size

    def let_go(self, job: QueuedJob) -> None:
        """``job`` is no longer held here (it ended, or left the queue)."""
        batch = job.batch
        if batch is not None:
            batch.jobs -= 1
            if batch.jobs == 0:
                self.held_bytes -= batch.size

    def _args_room(self) -> float:
        """Bytes more its user's jobs may hold here (--max_user_args)."""
        return args_room(self.server, self.user)

    def _over_args(self, key: int, attempt: int) -> ResultEntry:
        """The refusal of a job over its user's --max_user_args (logged once)."""
        quota = self.server.config.max_user_args
        if not self._args_refused:
            self._args_refused = True
            logger.warning(
                "%s: jobs refused: user %r has %d MiB of jobs' arguments at the "
                "scheduler, its --max_user_args quota",
                self.name,
                self.user,
                quota >> 20,
            )
        return ResultEntry.unrun(
            key,
            attempt,
            CANCELLED,
            f"refused: user {self.user!r} may have {quota >> 20} MiB of jobs' "
            "arguments at the scheduler at once, queued or running (its "
            "dispynb-scheduler --max_user_args quota); submit fewer jobs at once, "
            "send large data once (a file in depends), or have it raised",
        )

    def client_gone(self) -> None:
        """Its client went away (`_SentFiles.client_gone`); the nodes held for its
        answer take its jobs: none would come, and the jobs that wait for its
        ``recover_jobs`` would wait for ever."""
        super().client_gone()
        self._lift_holds()

    def client_replaced(self) -> None:
        """`recover_jobs` took it from a client still connected: as `client_gone`."""
        super().client_replaced()
        self._lift_holds()

    def take(self, node: str) -> QueuedJob:
        """The next queued job that may run on ``node`` (one `Account.takes` says
        there is): the first one pinned to it or to no node."""
        queue = self.queue
        if not self.account.pinned:
            return queue.popleft()
        for job in queue:
            if not job.pin or job.pin == node:
                queue.remove(job)
                self._unpin(job)
                return job
        raise LookupError(f"{self.name}: no queued job for node {node}")

    def _unpin(self, job: QueuedJob) -> None:
        """``job`` left the queue: no more a pinned one waiting for its node."""
        if job.pin:
            pinned = self.account.pinned
            left = pinned.get(job.pin, 0) - 1
            if left > 0:
                pinned[job.pin] = left
            else:
                pinned.pop(job.pin, None)

    def submitted(self) -> None:
        """The client's message that `submit` took was handled: its frame goes."""
        self._as_sent = None

    def cancel(self, message: JobCancel) -> None:
        """Cancel a job: here if it is queued, else on the node that runs it."""
        job = self.queue.find(message.key)
        if job is not None:
            self.queue.remove(job)
            self.let_go(job)
            self.account.queued -= 1
            self._unpin(job)
            self.end_jobs(
                [ResultEntry.unrun(job.key, job.attempt, CANCELLED, "cancelled")]
            )
            return
        running = self.running.get(message.key)
        if running is None:
            return
        running.cancelled = True  # (not handed back if its node is closed)
        upstream = self.upstream.get(running.node)
        if upstream is not None and upstream.conn is not None:
            self.server.write(
                upstream,
                dataclasses.replace(message, comp_id=self.comp_id),
            )

    def terminate_jobs(self) -> None:
        """Its recovering client's ``recover_jobs(terminate_pending=True)``: the
        queued jobs are cancelled, the running ones terminated on their nodes (their
        ends reach the client); it closes once they ended (`finish_if_done`)."""
        for job in list(self.queue):
            self.cancel(JobCancel(comp_id=self.comp_id, key=job.key, attempt=0))
        for key, running in list(self.running.items()):
            upstream = self.upstream.get(running.node)
            if upstream is not None and upstream.conn is not None:
                cancel = JobCancel(
                    comp_id=self.comp_id, key=key, attempt=running.attempt
                )
                self.server.write(upstream, cancel)
        self.finish_if_done()

    def close(self, message: ComputationClose) -> None:
        """Close the computation on every node; queued jobs are cancelled."""
        self.closing = True
        cancelled = [
            ResultEntry.unrun(j.key, j.attempt, CANCELLED, "its computation closed")
            for j in self.queue
        ]
        self.account.queued -= len(self.queue)
        self.account.pinned.clear()
        for job in self.queue:
            self.let_go(job)
        self.queue.clear()
        self.end_jobs(cancelled)
        close = dataclasses.replace(message, comp_id=self.comp_id)
        for upstream in self.upstream.values():
            if upstream.conn is not None and not upstream.closed:
                self.server.write(upstream, close)
            else:
                upstream.closed = True
        self.server.check_closed(self)

    def finish_if_done(self) -> None:
        """A recovered computation closes once its last job ended."""
        if self.recovering and not self.closing and not self.queue and not self.running:
            self.close(ComputationClose(comp_id=self.comp_id))

    def starts(self) -> list[list[Any]]:
        """``JobResults.started`` entries of its jobs running now: a recovering
        client (`recover_jobs`) heard no start of those that started while it was
        here, and shows them Running from then, as it did."""
        return [
            [job.key, job.attempt, job.start_time, 0]
            for job in self.running.values()
            if job.started
        ]


__all__ = ["QueuedJob", "SharedComputation", "Upstream"]
