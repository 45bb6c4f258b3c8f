"""``recover_jobs``: the jobs of a client that crashed, with their results.

A `JobCluster` given ``recover_file`` journals every job (id, arguments, node, state,
result) there, and its nodes keep running its jobs and keep their results for an hour
if the client goes away. `recover_jobs` reads the journal in a new process, asks each
node for the results of jobs that had not ended (authenticating with the same secret),
and returns every job of the journal, each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sqlite3
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from dispynb._loop import LoopRunner
from dispynb.clusterjournal import DEFAULT_PREFIX, latest_recover_file
from dispynb.codeoptions import _check_files_dir
from dispynb.defaults import MAX_MESSAGE_SIZE, PRE_AUTH_MAX_FRAME
from dispynb.errors import (
    AuthenticationError,
    ConfigurationError,
    DispynbError,
    MessageError,
    SerializationError,
)
from dispynb.job import DispyJob, JobStatus
from dispynb.journal import Journal, unreadable
from dispynb.options import check_size
from dispynb.protocol import serialize
from dispynb.protocol.chunks import (
    TOO_LARGE,
    Parts,
    add_chunk,
    take_output,
    take_stream,
)
from dispynb.protocol.framing import Buffer
from dispynb.protocol.messages import (
    FINISHED,
    ComputationClose,
    ComputationClosed,
    JobResults,
    JobsPlaced,
    Ping,
    Recover,
    Recovered,
    ResultChunk,
    SchedulerNodes,
)
from dispynb.protocol.records import ResultEntry, SharedNodeEntry, is_start
from dispynb.recoverysent import SentWhileAway
from dispynb.secret import is_credential, resolve_secret, split_credential
from dispynb.status import status_of
from dispynb.tracebacks import SourceMap
from dispynb.transport.addressing import parse_address
from dispynb.transport.connection import Connection
from dispynb.transport.connector import connect
from dispynb.transport.tls import client_context

logger = logging.getLogger(__name__)

#: While it waits for jobs still running, the client asks the node for a status
#: report every RECOVERY_PULSE s and pings it as often (a node frees the sessions
#: of silent clients); a node that sends nothing for RECOVERY_SILENCE s (stopped,
#: hung, cut off) is given up by this call, its jobs left for the next one.
RECOVERY_PULSE = 1.0
RECOVERY_SILENCE = 10.0

#: Seconds ``recover_jobs(terminate_pending=True)`` waits, once its ``timeout``
#: passed, for the ends of the jobs it had the nodes terminate.
TERMINATE_WAIT = 10.0


class _SilenceWatch:
    """Pings a node and closes its connection once it fell silent (`run`)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        #: Seconds the node had sent nothing when it was given up (None: it was not).
        self.silence: float | None = None

    def reason(self, exc: DispynbError) -> str:
        """Why the connection ended: the silence, or the connection's own error."""
        if self.silence is None:
            return str(exc)
        return (
            f"it sent nothing for {self.silence:.0f} s while its jobs ran (stopped "
            "or hung?)"
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


def recover_jobs(
    recover_file: str | None = None,
    timeout: float | None = None,
    terminate_pending: bool = False,
    *,
    secret: str | bytes | None = None,
    secret_file: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    cafile: str | None = None,
    max_message_size: int = MAX_MESSAGE_SIZE,
    max_result_size: int | str | None = None,
    files_dir: str | None = None,
) -> list[DispyJob]:
    """Recover the jobs of a client that crashed (dispy's function).

    Parameters
    ----------
    recover_file:
        The ``recover_file`` the crashed `JobCluster` was given. None (dispy's
        default) takes the newest ``_dispy_*`` file of the current directory, the
        one a cluster given no ``recover_file`` writes; it is removed once every
        result was collected. Its jobs were not journaled: each is returned as the
        nodes kept it, with ``id`` None and no arguments (as dispy's are). A file
        that does not exist (or no ``_dispy_*`` file) logs a warning and returns
        ``[]``, as dispy's does; one that is not a journal raises
        `ConfigurationError`.
    timeout:
        Seconds to wait for jobs still running on the nodes; None waits until they
        end. Jobs still running then are returned with status ``Running``. A node
        that sends nothing for ``RECOVERY_SILENCE`` s (stopped, hung, cut off) is
        given up: its jobs are returned ``Abandoned``, saying so, and the next
        call asks it again.
    terminate_pending:
        As in dispy: the jobs still running on the nodes when ``timeout`` passes
        are terminated there (the nodes are free for other work at once) and
        returned ``Terminated`` (queued ones ``Cancelled``), once their nodes say
        so, within ``TERMINATE_WAIT`` s; False (the default) lets them run on,
        their results kept for a later call. No effect without a ``timeout``
        (every job is waited for).
    secret, secret_file, certfile, keyfile, cafile:
        As for `JobCluster` (the journal never holds the secret; by default it comes
        from ``DISPYNB_SECRET`` or ``DISPYNB_SECRET_FILE``).
    max_message_size:
        Largest message (bytes) accepted from a node, as for `JobCluster`. A kept
        result that does not fit in one comes in chunks, assembled in place. (A
        dispynb-scheduler relays results in the messages its nodes sent them.)
    max_result_size:
        Bytes a recovered result may have (int, or a size such as ``"4G"``); a
        larger one ends ``Crashed`` ('the result arrived incomplete'). Default
        None: any result the node kept, up to this machine's memory.
    files_dir:
        Folder where the files jobs sent with ``dispy_send_file`` that their node
        (or scheduler) kept for this client are saved, at the paths the jobs sent
        them to, as the crashed cluster's ``files_dir`` (default: the current
        directory). A job that has not ended when this returns shows its latest
        provisional result (status ``ProvisionalResult``), if it sent one.

    Returns
    -------
    list of DispyJob
        Every job of the journal, in submission order, each exactly once, with its
        ``id``, arguments (``job._args``, ``job._kwargs``) and final status, result,
        output and traceback where known. A job that was never sent to a node ends
        ``Abandoned``.
    """
    default = recover_file is None
    if recover_file is None:
        recover_file = latest_recover_file()
        if recover_file is None:
            logger.warning(
                "no recovery file (%s*) in %s: nothing to recover; give the "
                "recover_file the crashed client used",
                DEFAULT_PREFIX,
                os.getcwd(),
            )
            return []
    elif not os.path.exists(recover_file):
        # dispy says so and returns no job: a script recovering once more (its file
        # removed by the last recovery) goes on.
        logger.warning(
            "recover_file %r does not exist: nothing to recover; give the "
            "recover_file the crashed client used",
            recover_file,
        )
        return []
    limits = _limits(max_message_size, max_result_size, files_dir)
    key = resolve_secret(secret, secret_file)
    tls = client_context(certfile, keyfile, cafile) if (certfile or cafile) else None
    journal = Journal.open_existing(recover_file)
    if journal is None:
        logger.warning("recover_file %r is empty: nothing to recover", recover_file)
        return []
    try:
        jobs, complete = _recover(
            journal, key, tls, _Deadline(timeout, terminate_pending), limits
        )
    except sqlite3.Error as exc:
        journal.close()
        raise unreadable(recover_file, exc) from None
    except BaseException:
        journal.close()  # the file stays as it was, for another try
        raise
    journal.close(remove=default and complete)
    return jobs


def _recover(
    journal: Journal,
    key: bytes | None,
    tls: ssl.SSLContext | None,
    timeout: _Deadline,
    limits: _Limits,
) -> tuple[list[DispyJob], bool]:
    """Every job of ``journal``, and whether none is left to recover later.

    What is known for sure is written to the journal; not a node that could not be
    reached (stopped, restarting, cut off): its jobs are returned Abandoned, saying
    why, and the next `recover_jobs` asks it again.
    """
    complete = True
    # The process's one I/O loop, as clusters use: it works from any thread, also
    # under a running loop (a notebook cell), where asyncio.run refuses to start.
    runner = LoopRunner.acquire()
    try:
        jobs: list[DispyJob] = []
        for recovery_id, _name, nodes in journal.computations():
            sources = _source_map(journal, recovery_id)
            recorded = journal.jobs(recovery_id)
            if not recorded:  # jobs not journaled (default file): take what nodes kept
                for address in nodes:
                    first = len(jobs)
                    complete &= runner.run_sync(
                        _collect_from,
                        address,
                        recovery_id,
                        key,
                        tls,
                        timeout,
                        jobs,
                        limits,
                    )
                    _map_tracebacks(jobs[first:], sources)
                continue
            waiting: dict[str, dict[int, DispyJob]] = {}
            # Jobs the client gave up with their node (Abandoned): by key, their
            # place in ``jobs``; asked for again (`_given_up_on`).
            given_up: dict[int, int] = {}
            for job_key, job, node in recorded:
                jobs.append(job)
                if job.done():
                    if node is not None:  # as when its result came from the node
                        job.ip_addr = parse_address(node)[0]
                    lost_with = _given_up_on(job, node, nodes)
                    if lost_with is not None:
                        given_up[job_key] = len(jobs) - 1
                        asked = waiting.setdefault(lost_with, {})
                        asked[job_key] = _asked_again(job)
                    continue
                if node is None:
                    job._complete(
                        JobStatus.Abandoned,
                        exception="not yet sent to a node when the client stopped",
                    )
                    journal.done(recovery_id, job_key, job)
                else:
                    # Sent to that node: Running, as dispy's job once sent (the
                    # journal keeps no more; it stays so if still running at the
                    # timeout).
                    job.status = JobStatus.Running
                    job.ip_addr = parse_address(node)[0]
                    waiting.setdefault(node, {})[job_key] = job
            for node, pending in waiting.items():
                settled = runner.run_sync(
                    _recover_from,
                    node,
                    recovery_id,
                    pending,
                    key,
                    tls,
                    timeout,
                    limits,
                )
                _map_tracebacks(pending.values(), sources)
                for job_key, job in pending.items():
                    if job_key in given_up:
                        if _node_had(job):
                            jobs[given_up[job_key]] = job
                        if job.done() and _node_had(job):
                            journal.done(recovery_id, job_key, job)
                    elif job.done() and job_key in settled:
                        journal.done(recovery_id, job_key, job)
                    else:
                        complete = False
        return jobs, complete
    finally:
        runner.release()


def _given_up_on(job: DispyJob, node: str | None, nodes: list[str]) -> str | None:
    """The node (``host:port``) a job the client recorded ``Abandoned`` was lost
    with, to ask for its result again, or None (never sent, or ended otherwise).

    A node lost for the client (cut off, frozen) may have run the job on and kept
    its result for an hour: the result exists, and the user wants it. A journal
    written before the address was kept for such jobs holds only the host: the
    computation's node on that host, if one only."""
    if job.status is not JobStatus.Abandoned or node is None:
        return None
    if node in nodes:
        return node
    on_host = [address for address in nodes if parse_address(address)[0] == node]
    return on_host[0] if len(on_host) == 1 else None


def _node_had(asked: DispyJob) -> bool:
    """Whether the node answered for a job `_asked_again`: its end (not one this
    call gave it for want of the node), its start or a provisional result (it
    runs there still). A job it never named keeps what the journal recorded."""
    if asked.done():
        return asked.status is not JobStatus.Abandoned
    return asked.start_time is not None or asked.status is JobStatus.ProvisionalResult


def _asked_again(job: DispyJob) -> DispyJob:
    """A copy of ``job`` (recorded ``Abandoned``) waiting for its node's answer:
    ``Running`` there, as a job sent to a node is once recovered."""
    asked = DispyJob(job.id, job._args, job._kwargs)
    asked._key = job._key
    asked.submit_time = job.submit_time
    asked.status = JobStatus.Running
    asked.ip_addr = job.ip_addr
    return asked


def _source_map(journal: Journal, recovery_id: str) -> SourceMap | None:
    """Where the computation's code came from, as its cluster recorded it."""
    text = journal.sources_of(recovery_id)
    if text is None:
        return None
    try:
        return SourceMap.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:  # only the lines are lost
        logger.debug("source map of %s unreadable: %s", recovery_id, exc)
        return None


def _map_tracebacks(jobs: Iterable[DispyJob], sources: SourceMap | None) -> None:
    """Point the recovered jobs' remote tracebacks at the script's lines, as the
    cluster does for the jobs it sees end (`dispynb.tracebacks`)."""
    if sources is None:
        return
    for job in jobs:
        if job.exception and isinstance(job.exception, str):
            job.exception = sources.rerender(job.exception)


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
        _abandon(
            pending,
            f"node {node} could not be reached to recover the job: {exc}; call "
            "recover_jobs again once it is back (its results are kept an hour)",
        )
        return set()
    settled = set(pending)
    watch = _SilenceWatch(conn)
    try:
        conn.write(
            Recover(
                comp_id=1,
                recovery_id=recovery_id,
                max_message_size=limits.message,
                pulse_interval=RECOVERY_PULSE,
            )
        )
        logger.debug("asked %s for the jobs of %s", node, recovery_id)
        streams: dict[tuple[int, int], Parts | None] = {}
        sent = SentWhileAway(limits.files_dir, conn.write)
        placed: dict[int, str] = {}  # behind a shared scheduler: where jobs ran

        async def read() -> None:
            nonlocal settled
            while any(not job.done() for job in pending.values()):
                message, buffers = await conn.recv()
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
        _abandon(
            pending,
            f"lost node {node} while recovering: {watch.reason(exc)}; call "
            "recover_jobs again once it is back",
        )
    finally:
        conn.close()
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
        return False
    watch = _SilenceWatch(conn)
    try:
        conn.write(
            Recover(
                comp_id=1,
                recovery_id=recovery_id,
                max_message_size=limits.message,
                pulse_interval=RECOVERY_PULSE,
            )
        )
        streams: dict[tuple[int, int], Parts | None] = {}
        sent = SentWhileAway(limits.files_dir, conn.write)
        other_user: list[bool] = []  # a scheduler keeps it for another user
        placed: dict[int, str] = {}  # behind a shared scheduler: where jobs ran

        async def read() -> None:
            while True:
                message, buffers = await conn.recv()
                if sent.take(message, buffers, {}, node):
                    continue  # files are saved; no job here is still running
                if isinstance(message, ResultChunk):
                    _add_chunk(streams, message, buffers, node, limits.result)
                elif isinstance(message, JobsPlaced):
                    _note_placed(message, placed)
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
        logger.warning("lost node %s while recovering: %s", node, watch.reason(exc))
    finally:
        conn.close()
    return False


def _add_chunk(
    streams: dict[tuple[int, int], Parts | None],
    message: ResultChunk,
    buffers: list[memoryview],
    node: str,
    cap: int,
) -> None:
    """A chunk of a large result (at most ``cap`` bytes in all)."""
    stream_id = (message.key, message.attempt)
    problem = add_chunk(streams, stream_id, message, buffers, cap)
    if problem == TOO_LARGE:
        logger.warning(
            "%s streams a result of job %d over %d bytes: refused (raise "
            "max_result_size)",
            node,
            message.key,
            cap,
        )
    elif problem is not None:
        logger.warning("%s sent a malformed result chunk", node)


def _running_behind(message: SchedulerNodes, pending: dict[int, DispyJob]) -> None:
    """A shared scheduler's report: each job still running names the node behind
    the scheduler that runs it (dispy's ``ip_addr``), not the scheduler."""
    for item in message.nodes:
        try:
            entry = SharedNodeEntry.from_wire(item)
        except MessageError:
            continue
        for key in entry.running:
            job = pending.get(key)
            if job is not None and not job.done():
                job.ip_addr = entry.host


def _note_placed(message: JobsPlaced, placed: dict[int, str]) -> None:
    """A shared scheduler kept where it sent jobs: each names that node's host
    (dispy's ``ip_addr``) when its result comes, not the scheduler."""
    if not isinstance(message.node, str) or not isinstance(message.keys, list):
        return
    try:
        host = parse_address(message.node)[0]
    except ConfigurationError:
        return
    for key in message.keys:
        if type(key) is int:
            placed[key] = host


def _apply(
    message: JobResults,
    buffers: list[memoryview],
    pending: dict[int, DispyJob],
    ip: str,
    streams: dict[tuple[int, int], Parts | None],
    placed: dict[int, str],
) -> None:
    """Complete the jobs of ``pending`` whose results ``message`` has; each names
    ``ip`` as where it ran, or the node ``placed`` says it went to."""
    for began in message.started:  # a job running: when it started, as before
        if is_start(began):
            running = pending.get(began[0])
            if running is not None and not running.done():
                running.start_time = float(began[2])
    offset = 0
    for entry in message.results:
        record, streamed = ResultEntry.from_wire(entry)
        key, attempt, outcome, start, end, stdout, stderr, exception, count = record
        result_buffers: list[Buffer] | None
        if streamed:  # its buffers (and a large output) came before, in chunks
            stdout, stderr, exception = take_output(
                streams, (key, attempt), stdout, stderr, exception
            )
            chunks = take_stream(streams, (key, attempt), count)
            result_buffers = None if chunks is None else [*chunks]
        else:
            result_buffers = [*buffers[offset : offset + count]]
            offset += count
            streams.pop((key, attempt), None)  # chunks sent for it: of no use now
        job = pending.get(key)
        if job is None or job.done():
            continue  # delivered twice (before the crash, and now): once is enough
        result: Any = None
        if outcome == FINISHED and result_buffers is None:
            outcome, exception = "crashed", "the result arrived incomplete"
        elif outcome == FINISHED and result_buffers is not None:
            try:
                result = serialize.loads(result_buffers)
            except SerializationError as exc:
                outcome, exception = "crashed", f"the result cannot be unpickled: {exc}"
        job._complete(
            status_of(outcome),
            result=result,
            stdout=stdout,
            stderr=stderr,
            exception=exception,
            start_time=start or None,
            end_time=end or None,
            ip_addr=placed.get(key, ip),
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


def _limits(max_message_size: Any, max_result_size: Any, files_dir: Any) -> _Limits:
    """Check `recover_jobs`'s size arguments (as `JobCluster` checks its own) and
    its ``files_dir``."""
    message = check_size(max_message_size, "max_message_size")
    if message is None or message < PRE_AUTH_MAX_FRAME:
        raise ConfigurationError(
            f"max_message_size must be a number of bytes, at least "
            f"{PRE_AUTH_MAX_FRAME}; got {max_message_size!r}"
        )
    result = check_size(max_result_size, "max_result_size")
    if result is None:  # what the node kept: bounded by what this machine can hold
        try:
            result = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            result = sys.maxsize
    return _Limits(message, result, _check_files_dir(files_dir))


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


def _abandon(pending: dict[int, DispyJob], reason: str) -> None:
    for job in pending.values():
        if not job.done():
            job._complete(JobStatus.Abandoned, exception=reason)
