"""`recover_jobs`' conversation with one node (or scheduler): ask it for the jobs it
kept for a computation, read their ends within the call's timeout (terminating the
jobs still running if asked), and give it up once it falls silent."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from dispynb.errors import AuthenticationError, DispynbError, NodeNotServingError
from dispynb.job import DispyJob, JobStatus
from dispynb.protocol.chunks import Parts
from dispynb.protocol.handshake import peer_text
from dispynb.protocol.messages import (
    KEPT_UNAVAILABLE,
    ComputationClose,
    ComputationClosed,
    Error,
    JobResults,
    JobsPlaced,
    Ping,
    Recover,
    Recovered,
    ResultChunk,
    SchedulerNodes,
)
from dispynb.protocol.records import ResultEntry
from dispynb.recoveryresults import _add_chunk, _apply, _note_placed, _running_behind
from dispynb.recoverysent import SentWhileAway
from dispynb.secret import is_credential, split_credential
from dispynb.transport.addressing import parse_address
from dispynb.transport.connection import Connection
from dispynb.transport.connector import connect

logger = logging.getLogger("dispynb.recovery")

#: While it waits for jobs still running, the client asks the node for a status
#: report every RECOVERY_PULSE s and pings it as often (a node frees the sessions
#: of silent clients); a node that sends nothing for RECOVERY_SILENCE s (stopped,
#: hung, cut off) is given up by this call, its jobs left for the next one.
RECOVERY_PULSE = 1.0
RECOVERY_SILENCE = 10.0

#: Characters shown of why a node cannot send its kept results now (an
#: authenticated node's words): what its operator is to do, and why, which
#: `peer_text`'s usual 200 cut off.
KEPT_UNAVAILABLE_TEXT = 1000

#: Seconds ``recover_jobs(terminate_pending=True)`` waits, once its ``timeout``
#: passed, for the ends of the jobs it had the nodes terminate.
TERMINATE_WAIT = 10.0


class _SilenceWatch:
    """Pings a node and closes its connection once it fell silent (`run`)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        #: Seconds the node had sent nothing when it was given up (None: it was not).
        self.silence: float | None = None
        #: The node's words if the last message it sent was an `Error`: why it
        #: ended the connection, if it did next (a scheduler refusing one more
        #: session of the user, its credential revoked).
        self.said: str | None = None

    def heard(self, message: object) -> None:
        """Note the message the node sent last (`said`)."""
        if isinstance(message, Error):
            self.said = peer_text(message.message, KEPT_UNAVAILABLE_TEXT)
        else:
            self.said = None

    def reason(self, exc: DispynbError) -> str:
        """Why the connection ended: the silence, or the connection's own error."""
        if self.silence is None:
            return str(exc)
        return (
            f"it sent nothing for {self.silence:.0f} s while its jobs ran (stopped "
            "or hung?)"
        )

    def lost(self, node: str, exc: DispynbError) -> str:
        """Why the recovery from ``node`` ended with ``exc``: in the node's words if
        it said why, then ended it; else the node was lost."""
        if self.said is not None and self.silence is None:
            return (
                f"{node} ended the recovery: {self.said} (the recovery file keeps "
                "the job: call recover_jobs again)"
            )
        return (
            f"lost node {node} while recovering: {self.reason(exc)}; call "
            "recover_jobs again once it is back"
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self.conn
        reads, heard = conn.reads, loop.time()
        while not conn.closed:
            expected = loop.time() + RECOVERY_PULSE
            await asyncio.sleep(RECOVERY_PULSE)
            now = loop.time()
            if conn.reads != reads or conn.unread_bytes() or now - expected > 1.0:
                # Bytes came (or wait unread, or this loop was held up): alive.
                reads, heard = conn.reads, now
            elif now - heard > RECOVERY_SILENCE:
                self.silence = now - heard
                conn.close()
                return
            with contextlib.suppress(DispynbError):
                conn.write(Ping())


@contextlib.asynccontextmanager
async def _watching(watch: _SilenceWatch) -> AsyncIterator[None]:
    """``watch`` runs for the block."""
    task = asyncio.get_running_loop().create_task(watch.run())
    try:
        yield
    finally:
        task.cancel()


async def _recover_from(
    node: str,
    recovery_id: str,
    pending: dict[int, DispyJob],
    secret: bytes | None,
    tls: ssl.SSLContext | None,
    timeout: _Deadline,
    limits: _Limits,
) -> set[int]:
    """Ask ``node`` for the ``pending`` jobs; the keys of those whose end is known
    for sure (to be journaled), not of those abandoned for want of the node."""
    host = parse_address(node)[0]
    conn = await _connect(node, secret, tls, limits, pending)
    if conn is None:
        return set()
    settled = set(pending)
    watch = _SilenceWatch(conn)
    sent = SentWhileAway(limits.files_dir, conn.write)
    try:
        conn.write(_recover(recovery_id, limits))
        logger.debug("asked %s for the jobs of %s", node, recovery_id)
        streams: dict[tuple[int, int], Parts | None] = {}
        placed: dict[int, str] = {}  # behind a shared scheduler: where jobs ran

        async def read() -> None:
            nonlocal settled
            while any(not job.done() for job in pending.values()):
                message, buffers = await conn.recv()
                watch.heard(message)
                if sent.take(message, buffers, pending, node):
                    continue
                if isinstance(message, ResultChunk):
                    _add_chunk(streams, message, buffers, node, limits.result)
                elif isinstance(message, JobsPlaced):
                    _note_placed(message, placed)
                elif isinstance(message, JobResults):
                    _apply(message, buffers, pending, host, streams, placed)
                elif isinstance(message, SchedulerNodes):
                    _running_behind(message, pending)
                elif isinstance(message, Error) and message.code == KEPT_UNAVAILABLE:
                    # The results are whole, and stay kept: not journaled.
                    settled = {k for k, job in pending.items() if job.done()}
                    why = peer_text(message.message, KEPT_UNAVAILABLE_TEXT)
                    _unavailable(pending, message.keys, f"node {node}: {why}", node)
                    return  # the node lets this recovery go
                elif isinstance(message, Recovered) and message.other_user:
                    settled = set()  # the right user's recovery gets them
                    _abandon(
                        pending,
                        f"scheduler {node} keeps this computation for another user, "
                        f"not for user {split_credential(secret)[0]!r}: call "
                        "recover_jobs again with "
                        "the credential of the user who ran it (secret_file=)",
                    )
                elif isinstance(message, Recovered) and not message.found:
                    _abandon(pending, _gone_from(node, secret))
                elif isinstance(message, Recovered) and message.cut_short:
                    _abandon(
                        pending,
                        f"node {node} was killed (or its machine stopped) while it "
                        "held the job: the job's end and result were lost with it "
                        "(the node, started again, kept none for it)",
                    )
                elif (
                    isinstance(message, Recovered) and not message.running
                ) or isinstance(message, ComputationClosed):
                    _abandon(
                        pending, f"the job never reached node {node}: it did not run"
                    )

        async with _watching(watch):
            await timeout.read(read, conn, node)
    except TimeoutError:
        logger.info("jobs still running on %s after %s s", node, timeout.timeout)
    except DispynbError as exc:
        settled = {k for k, job in pending.items() if job.done()}
        _abandon(pending, watch.lost(node, exc))
    finally:
        conn.close()
        sent.said(node)
    return settled


async def _collect_from(
    node: str,
    recovery_id: str,
    secret: bytes | None,
    tls: ssl.SSLContext | None,
    timeout: _Deadline,
    out: list[DispyJob],
    limits: _Limits,
) -> bool:
    """Append a job for every result ``node`` kept for ``recovery_id``; return True
    once the node has no job of it left running (False: timeout or lost)."""
    host = parse_address(node)[0]
    conn = await _connect(node, secret, tls, limits, {})
    if conn is None:
        return False
    watch = _SilenceWatch(conn)
    sent = SentWhileAway(limits.files_dir, conn.write)
    try:
        conn.write(_recover(recovery_id, limits))
        streams: dict[tuple[int, int], Parts | None] = {}
        other_user: list[bool] = []  # a scheduler keeps it for another user
        unreadable: list[bool] = []  # the node could not send some results now
        placed: dict[int, str] = {}  # behind a shared scheduler: where jobs ran

        async def read() -> None:
            while True:
                message, buffers = await conn.recv()
                watch.heard(message)
                if sent.take(message, buffers, {}, node):
                    continue  # files are saved; no job here is still running
                if isinstance(message, ResultChunk):
                    _add_chunk(streams, message, buffers, node, limits.result)
                elif isinstance(message, JobsPlaced):
                    _note_placed(message, placed)
                elif isinstance(message, Error) and message.code == KEPT_UNAVAILABLE:
                    why = peer_text(message.message, KEPT_UNAVAILABLE_TEXT)
                    if not isinstance(message.keys, list):  # none of them now
                        raise DispynbError(why)
                    _unreadable(out, message.keys, host, f"node {node}: {why}")
                    unreadable.append(True)
                    return  # the node lets this recovery go; the rest stays kept
                elif isinstance(message, JobResults):
                    found = {}
                    for entry in message.results:
                        job = DispyJob(0, (), {})
                        job.id = None  # nodes do not know ids (nor did dispy's)
                        found[ResultEntry.from_wire(entry)[0].key] = job
                        out.append(job)
                    _apply(message, buffers, found, host, streams, placed)
                elif isinstance(message, Recovered) and message.other_user:
                    other_user.append(True)
                    return
                elif (
                    isinstance(message, Recovered)
                    and (not message.found or not message.running)
                ) or isinstance(message, ComputationClosed):
                    return

        async with _watching(watch):
            await timeout.read(read, conn, node)
        if unreadable:
            return False  # kept there, and the file here, for the next call
        if not other_user:
            return True
        # The file stays, for the right user's recovery.
        logger.warning(
            "scheduler %s keeps computation %s for another user, not for user %r: "
            "call recover_jobs again with the credential of the user who ran it",
            node,
            recovery_id,
            split_credential(secret)[0],
        )
    except TimeoutError:
        logger.info("jobs still running on %s after %s s", node, timeout.timeout)
    except DispynbError as exc:
        logger.warning("%s", watch.lost(node, exc))
    finally:
        conn.close()
        sent.said(node)
    return False


async def _connect(
    node: str,
    secret: bytes | None,
    tls: ssl.SSLContext | None,
    limits: _Limits,
    pending: dict[int, DispyJob],
) -> Connection | None:
    """A connection to ``node``; None if it cannot be reached (``pending`` are
    abandoned: the next `recover_jobs` may find it back). A node refusing the
    secret stops `recover_jobs` (`_refused`)."""
    host, port = parse_address(node)
    try:
        conn, _welcome = await connect(
            host,
            port,
            secret=secret,
            max_message_size=limits.message,
            ssl_context=tls,
        )
    except AuthenticationError as exc:
        raise _refused(node, exc, secret) from None
    except DispynbError as exc:
        logger.warning("cannot recover jobs from %s: %s", node, exc)
        # A node that runs but takes no connection (draining) says why: not a
        # node that could not be reached.
        refused = (
            "took no connection"
            if isinstance(exc, NodeNotServingError)
            else "could not be reached"
        )
        _abandon(
            pending,
            f"node {node} {refused} to recover the job: {exc}; call "
            "recover_jobs again once it is back (its results are kept an hour)",
        )
        return None
    return conn


def _recover(recovery_id: str, limits: _Limits) -> Recover:
    """The request for the jobs a node kept for ``recovery_id``."""
    return Recover(
        comp_id=1,
        recovery_id=recovery_id,
        max_message_size=limits.message,
        pulse_interval=RECOVERY_PULSE,
    )


@dataclasses.dataclass(frozen=True)
class _Deadline:
    """`recover_jobs`' ``timeout``, over all its nodes (as dispy's), and what is
    done with the jobs still running when it passes (``terminate_pending``)."""

    timeout: float | None
    terminate: bool
    #: `time.monotonic` when the timeout passes (None: never).
    at: float | None = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        at = None if self.timeout is None else time.monotonic() + self.timeout
        object.__setattr__(self, "at", at)

    async def read(
        self, read: Callable[[], Awaitable[None]], conn: Connection, node: str
    ) -> None:
        """``read()`` until the timeout passes; then, with ``terminate``, have the
        node terminate the jobs still running and read on for their ends (at most
        `TERMINATE_WAIT` s). Raises TimeoutError if ``read`` did not return."""
        left = None if self.at is None else max(self.at - time.monotonic(), 0.0)
        try:
            async with asyncio.timeout(left):
                return await read()
        except TimeoutError:
            if not self.terminate:
                raise
        logger.info("terminating the jobs still running on %s", node)
        conn.write(ComputationClose(comp_id=1, terminate=True))
        async with asyncio.timeout(TERMINATE_WAIT):
            await read()


@dataclasses.dataclass(frozen=True)
class _Limits:
    """`recover_jobs`'s bounds: the largest message, the largest result."""

    message: int
    result: int
    #: Where files jobs sent are saved (`SentWhileAway`).
    files_dir: str


def _refused(
    node: str, exc: AuthenticationError, secret: bytes | None
) -> AuthenticationError:
    """A node refused the secret: no job of the journal is settled by that, so
    `recover_jobs` stops, saying which secret to give, and changes nothing."""
    if secret is None:
        return AuthenticationError(
            f"recover_jobs was given no secret, and node {node} needs one: give the "
            "secret the crashed cluster used (secret=, secret_file=, DISPYNB_SECRET "
            "or DISPYNB_SECRET_FILE); the recovery file is unchanged"
        )
    return AuthenticationError(
        f"recover_jobs: {exc}; the recovery file is unchanged: call it again with "
        "the secret the crashed cluster used"
    )


def _gone_from(node: str, secret: bytes | None) -> str:
    """Why jobs are abandoned whose node (or scheduler) no longer has their
    computation. A scheduler keeps none across its restart (kill -9, a reboot)."""
    if not is_credential(secret):
        return f"node {node} no longer has the computation"
    return (
        f"scheduler {node} no longer has the computation: it closed it (the client "
        "was away longer than its --zombie_interval) or it was restarted since (a "
        "scheduler keeps no job across a restart)"
    )


def _unavailable(
    pending: dict[int, DispyJob], keys: object, reason: str, node: str
) -> None:
    """``node`` cannot send the results of the jobs of ``keys`` now (None: of any
    job; they stay kept there): those end Abandoned for ``reason``. Its other jobs
    not done run there still, or their ends wait there: they are left Running, as
    at the call's timeout, for the next `recover_jobs` (not abandoned for the
    reason of another job's result)."""
    if not isinstance(keys, list):
        _abandon(pending, reason)
        return
    named = {key for key in keys if type(key) is int}
    _abandon({k: job for k, job in pending.items() if k in named}, reason)
    left = sorted(k for k, job in pending.items() if not job.done())
    if left:
        logger.info(
            "node %s could not send all it kept: job(s) %s left Running (their "
            "ends are for the next recover_jobs)",
            node,
            ", ".join(map(str, left)),
        )


def _unreadable(out: list[DispyJob], keys: list[int], host: str, reason: str) -> None:
    """A recovery without a journal: the node could not send the results of the
    jobs of ``keys`` now (they stay kept there). Each is returned Abandoned for
    ``reason``, so that the call says which results it lacks, and why."""
    for key in keys:
        if type(key) is not int:
            continue
        job = DispyJob(0, (), {})
        job.id = None  # as the collected ones: nodes do not know ids
        job.ip_addr = host
        job._complete(JobStatus.Abandoned, exception=reason)  # says it is kept
        out.append(job)


def _abandon(pending: dict[int, DispyJob], reason: str) -> None:
    for job in pending.values():
        if not job.done():
            job._complete(JobStatus.Abandoned, exception=reason)
