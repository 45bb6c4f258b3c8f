"""`ClientSession`: serves one authenticated client connection on the node.

Dispatches the client's messages (one handler per op) to its computations, and sends
results back in batches: all results that arrive during one turn of the event loop
travel in one message per computation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dispynb.defaults import MAX_MESSAGE_SIZE, PRE_AUTH_MAX_FRAME
from dispynb.errors import (
    DispynbError,
    MessageError,
    ProtocolError,
    SerializationError,
    SetupError,
)
from dispynb.protocol import shm
from dispynb.protocol.chunks import split_result
from dispynb.protocol.files import safe_relative_path
from dispynb.protocol.handshake import peer_text
from dispynb.protocol.messages import (
    RETURNED,
    TERMINATED,
    ComputationClose,
    ComputationClosed,
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    Error,
    FileFromNode,
    FilePlace,
    FilePlaced,
    FilePut,
    FilesMissing,
    JobCancel,
    JobProvisional,
    JobResults,
    JobSubmit,
    Message,
    NodeStatus,
    Ping,
    Recover,
    Recovered,
)
from dispynb.protocol.records import ResultEntry
from dispynb.transport.connection import BadMessageError, Connection
from nodeserver import sharedbody
from nodeserver.computation import STREAM_BYTES, Computation, JobLimits, NodeJob
from nodeserver.keeper import Kept, KeptResult, ResultKeeper
from nodeserver.monitor import avail_info
from nodeserver.recovering import KeptResultSender

if TYPE_CHECKING:
    from nodeserver.server import NodeServer

logger = logging.getLogger(__name__)

#: Seconds between status reports when the client asks for none (no pulse_interval).
STATUS_INTERVAL = 10.0

#: Files of at least this many bytes are checked against their digest and written in
#: a thread, not on the loop: hashing 100 MB takes long enough for the node's pulses
#: to stop and its clients to declare it dead. This session reads its next message
#: once the file is stored, so the order of its messages holds.
HASH_OFF_LOOP_BYTES = 1 << 20

#: Seconds a shutting-down node waits for a client to take back its unstarted jobs.
HAND_BACK_TIMEOUT = 5.0

#: Seconds a job's start may wait to ride on a results message: a job shorter than
#: this costs no message of its own for its start (latency of tiny jobs, W2).
START_REPORT_DELAY = 0.005

#: A results batch is cut once its buffers pass this size.
BATCH_BYTES = 32 * 1024 * 1024

#: A result of `STREAM_BYTES` or more (its pickled buffers) travels in `ResultChunk`
#: messages of `CHUNK_BYTES`, so the client can assemble it in place.
CHUNK_BYTES = 16 * 1024 * 1024

#: Bytes queued for a client (not yet taken by its socket) over which this session's
#: computations stop reading from their workers until the queue has drained: a client
#: that does not read holds at most this much here, plus one result per worker.
OUT_HIGH = 32 * 1024 * 1024

_session_ids = itertools.count(1)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (never empty, never a dot name)."""
    name = _UNSAFE.sub("_", text).strip("._")[:64]
    return name or "x"


class ClientSession:
    """One client's connection: its computations and its outgoing results."""

    def __init__(self, conn: Connection, server: NodeServer, client_name: str) -> None:
        self.conn = conn
        if sharedbody.AVAILABLE:
            # Large messages land in memory the workers can map: a job's arguments
            # reach its worker without a copy (`nodeserver.sharedbody`).
            conn.decoder.take_body = sharedbody.BODIES.take
        self.server = server
        self.client_name = client_name
        self.session_id = next(_session_ids)
        self._computations: dict[int, Computation] = {}
        self._out: dict[int, tuple[list[list[Any]], list[memoryview]]] = {}
        self._starts: dict[int, list[list[Any]]] = {}  # comp_id -> job starts
        self._starts_timer: asyncio.TimerHandle | None = None
        self._oldest_start: float | None = None  # time.time() of the first waiting
        self._flush_pending = False
        self._held = False  # workers are not read: the client is not reading
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting_for_files: dict[int, tuple[set[str], Any]] = {}
        self._recovery: dict[int, tuple[str, float]] = {}  # comp_id -> (id, keep)
        # Computations kept only for a crash (dispy's default recovery): a client
        # that goes silent while connected frees them, as one without recovery.
        self._crash_only: set[int] = set()
        self._orphaned = False  # this node closed the connection of a silent client
        self._claims: list[Kept] = []
        self._refused_files: dict[str, str] = {}  # digest -> why
        # Files this client sent, held in the store until the session ends: another
        # client's computation closing must not remove an object this one uses.
        self._file_holds: set[str] = set()
        # A large file waiting to be stored off the loop (`serve` stores it).
        self._deferred_file: tuple[FilePut, memoryview] | None = None
        self._transferred = 0  # bytes of files received (--transfer-quota)
        self._status_interval: float | None = None
        self._last_heard = time.monotonic()
        self._status_task: asyncio.Task[None] | None = None
        # Shared memory holding the arguments of jobs not yet reported back:
        # comp_id -> (key, attempt) -> name; and the results workers wrote to shared
        # memory for this client (it unlinks them as it reads them). What is left is
        # unlinked when the session ends, so a client killed with SIGKILL leaves
        # nothing behind.
        self._segments: dict[int, dict[tuple[int, int], str]] = {}
        self._result_segments: dict[int, set[str]] = {}
        self._handlers: dict[type[Message], Callable[[Any, list[memoryview]], None]] = {
            ComputationSetup: self._on_setup,
            JobSubmit: self._on_submit,
            JobCancel: self._on_cancel,
            ComputationClose: self._on_close,
            FilePut: self._on_file_put,
            FilePlace: self._on_file_place,
            Ping: self._on_ping,
            Recover: self._on_recover,
        }

    async def serve(self) -> None:
        """Handle messages until the connection ends; then close all computations."""
        try:
            # Messages are handled in the socket's read callback: no task switch. A
            # large file stops the dispatch; it is stored off the loop, then the
            # messages after it are handled.
            while True:
                await self.conn.dispatch(self._on_message, self._on_bad_message)
                deferred, self._deferred_file = self._deferred_file, None
                if deferred is None:
                    break
                await self._store_file_off_loop(*deferred)
        except MessageError as exc:
            # A message whose parts disagree cannot be trusted (nor what follows
            # it): say why before the connection ends, so the client can report it.
            await self._refuse(exc)
            raise
        finally:
            for _missing, start in self._waiting_for_files.values():
                start.close()  # never started: the files did not all arrive
            self._waiting_for_files.clear()
            for claimed in self._claims:
                claimed.deliver = None  # a recovering client went away too
            closing = []
            closed: set[int] = set()
            for comp_id, computation in self._computations.items():
                recovery = self._recovery.pop(comp_id, None)
                if (
                    recovery is not None
                    and self._orphaned
                    and comp_id in self._crash_only
                ):
                    self.server.keeper.release(recovery[0])
                    recovery = None
                if recovery is not None:  # its client may come back for the results
                    computation.hold_workers(False)  # the keeper takes its results
                    self.server.keeper.adopt(*recovery)
                else:
                    closing.append(computation.close(terminate=True))
                    closed.add(comp_id)
            adopted = set(self._computations) - closed
            # Results its workers wrote and never reported (client killed first).
            prefixes = [
                shm.result_prefix(c.path)
                for comp_id, c in self._computations.items()
                if comp_id in closed and comp_id in self._segments
            ]
            self._computations.clear()
            await asyncio.gather(*closing, return_exceptions=True)
            for prefix in prefixes:
                shm.unlink_results(prefix)
            for comp_id, segments in self._segments.items():
                if comp_id not in adopted:  # the keeper's jobs still need theirs
                    for name in segments.values():
                        shm.unlink(name)
            for names in self._result_segments.values():
                for name in names:  # kept results hold copies (ResultKeeper.record)
                    shm.unlink(name)
            if self._segments and not adopted:  # a killed client leaves its pool
                shm.sweep()
            self._segments.clear()
            self._result_segments.clear()
            for digest in self._file_holds:
                self.server.store.release(digest)
            self._file_holds.clear()
            for task in self._tasks:
                task.cancel()

    async def _refuse(self, exc: MessageError) -> None:
        """Tell the client why its connection ends (best effort, bounded)."""
        if self.conn.closed:
            return
        self._flush()  # results already queued go first
        self._send_error(
            "protocol", f"{peer_text(exc)}: the node closes this connection"
        )
        with contextlib.suppress(DispynbError, TimeoutError):
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await self.conn.flush()

    # -- handlers ------------------------------------------------------------------

    def _on_bad_message(self, error: BadMessageError) -> None:
        """A message this node does not understand: say so; the session goes on."""
        text = peer_text(error)
        logger.warning(
            "%s sent a message this node cannot use: %s", self.conn.peer, text
        )
        self._send_error(
            "protocol",
            f"{text}: ignored (are client and node the same dispynb version?)",
        )

    def _on_message(self, message: Message, buffers: list[memoryview]) -> bool:
        """Handle one message; True stops the dispatch (a file to store off the
        loop first)."""
        self._last_heard = time.monotonic()
        handler = self._handlers.get(type(message))
        if handler is None:
            logger.warning("%s sent unexpected %r", self.conn.peer, message.op)
            self._send_error("protocol", f"unexpected message {message.op!r}")
            return False
        handler(message, buffers)
        return self._deferred_file is not None

    def _on_setup(self, message: ComputationSetup, buffers: list[memoryview]) -> None:
        if message.comp_id in self._computations:
            self._send_error("protocol", f"computation {message.comp_id} exists")
            return
        config = self.server.config
        workers = (
            config.cpus if message.workers <= 0 else min(message.workers, config.cpus)
        )
        client_dir = (
            f"{safe_name(self.client_name or 'client')}-{os.getpid()}-{self.session_id}"
        )
        if message.dest_path:
            parts = [
                safe_name(p) for p in message.dest_path.split("/") if p not in ("", ".")
            ]
            comp_dir = os.path.join(*parts) if parts else "default"
        else:
            comp_dir = f"{safe_name(message.name)}-{message.comp_id}"
        computation = Computation(
            comp_id=message.comp_id,
            name=message.name,
            workers=workers,
            path=os.path.join(config.dest_path, client_dir, comp_dir),
            budget=self.server.budget,
            report=self._reporter(message.comp_id),
            report_provisional=self._provisional_reporter(message.comp_id),
            report_file=self._file_reporter(message.comp_id),
            store=self.server.store,
            node_name=config.name,
            node_address=self._local_ip(),
            max_message_size=config.max_message_size,
            remove_path=message.cleanup or config.force_cleanup,
            limits=JobLimits(
                max_output=message.max_output,
                max_result=message.max_result,
                max_pids=message.max_pids,
                fresh_process=message.fresh_process,
            ),
            node_stopping=lambda: self.server.draining,
            launcher=self.server.launcher,
        )
        computation.on_failure = lambda reason: self._computation_died(
            message.comp_id, reason
        )
        computation.on_start = self._starter(message.comp_id)
        computation.on_shutdown_request = lambda: self.server.client_shutdown(
            f"computation {message.name!r} of client {self.client_name!r}"
        )
        if message.recovery_id:
            kept = self.server.keeper.register(message.recovery_id, computation)
            kinds = computation.result_kinds  # of the result being reported
            self._recovery[message.comp_id] = (
                message.recovery_id,
                message.keep_results,
            )
            if not message.keep_sent:
                self._crash_only.add(message.comp_id)
            keep_sent = message.keep_sent

            def record(entry: list[Any], buffers: list[memoryview]) -> None:
                # With keep_sent every result, else only what ends once the client
                # is gone (nothing is written before).
                if keep_sent or kept.adopted:
                    key = entry[0]
                    ResultKeeper.record(kept, entry, buffers, kinds.get(key, ""))

            computation.also_report(record)
        self._computations[message.comp_id] = computation
        if self._held:
            computation.hold_workers(True)
        try:
            files = self._check_files(message.files)
        except ProtocolError as exc:
            self._computations.pop(message.comp_id, None)
            self._write(ComputationFailed(comp_id=message.comp_id, message=str(exc)))
            return
        missing = {digest for _, digest in files if not self.server.store.has(digest)}
        try:
            sizes = {e[1]: e[2] for e in message.files if e[1] in missing}
            self._check_quota(sum(sizes.values()), "the computation's files")
        except ProtocolError as exc:
            self._computations.pop(message.comp_id, None)
            self._write(ComputationFailed(comp_id=message.comp_id, message=str(exc)))
            return
        start = self._start(computation, buffers, files, message.setup_timeout)
        self._start_status_reports(message.pulse_interval)
        if not missing:
            self._spawn(start)
            return
        self._waiting_for_files[message.comp_id] = (missing, start)
        self._write(FilesMissing(comp_id=message.comp_id, digests=sorted(missing)))

    def _start_status_reports(self, interval: float | None) -> None:
        """Report the node's resources every ``interval`` s (the shortest asked for)."""
        interval = interval or STATUS_INTERVAL
        if self._status_interval is not None and self._status_interval <= interval:
            return
        self._status_interval = interval
        if self._status_task is None:
            self._status_task = asyncio.get_running_loop().create_task(
                self._report_status()
            )
            self._tasks.add(self._status_task)

    async def _report_status(self) -> None:
        """Pulse: report resources; and free the computations of a silent client."""
        orphan_timeout = self.server.config.orphan_timeout
        while True:
            await asyncio.sleep(self._status_interval or STATUS_INTERVAL)
            if orphan_timeout and time.monotonic() - self._last_heard > orphan_timeout:
                logger.warning(
                    "client %r at %s silent for %.0f s: freeing its computations",
                    self.client_name,
                    self.conn.peer,
                    orphan_timeout,
                )
                self._orphaned = True
                self.conn.close()  # serve() then terminates its computations
                return
            avail = avail_info(self.server.config.dest_path)
            self._write(NodeStatus(avail=avail))

    def _on_ping(self, message: Ping, buffers: list[memoryview]) -> None:
        """The client is alive (recorded for every message received)."""

    def _local_ip(self) -> str:
        """This node's IP address as its client reached it (dispy_node_ip_addr)."""
        address = self.conn.local_address
        if address is not None:
            return address[0]
        return self.server.config.host

    def _check_files(self, entries: list[list[Any]]) -> list[tuple[str, str]]:
        files = []
        for entry in entries:
            if len(entry) != 3 or not isinstance(entry[2], int):
                raise ProtocolError("malformed file entry in computation-setup")
            path, digest, size = entry
            self.server.store.check_size(size, f"file {path!r}")
            self.server.store.path(digest)  # validates the digest
            files.append((safe_relative_path(path), digest))
        return files

    def _check_quota(self, size: int, what: str) -> None:
        """Raise `ProtocolError` if ``size`` more bytes of files would pass the
        node's per-computation transfer quota."""
        quota = self.server.config.transfer_quota
        if quota and self._transferred + size > quota:
            raise ProtocolError(
                f"{what} of {size} bytes would take this computation's files past the "
                f"node's transfer quota of {quota} bytes ({self._transferred} sent "
                "already; dispynb-node --transfer-quota)"
            )

    def _on_file_put(self, message: FilePut, buffers: list[memoryview]) -> None:
        if len(buffers) != 1 or buffers[0].nbytes != message.size:
            raise MessageError("file-put carries one buffer of the announced size")
        store = self.server.store
        try:
            self._check_quota(message.size, "a file")
            self._transferred += message.size
            if message.size >= HASH_OFF_LOOP_BYTES and not store.has(message.digest):
                self._deferred_file = (message, buffers[0])  # `serve` stores it
                return
            store.put(message.digest, buffers[0])
        except ProtocolError as exc:
            self._refuse_file(message.digest, exc)
            return
        self._file_stored(message.digest)

    async def _store_file_off_loop(self, message: FilePut, data: memoryview) -> None:
        """Check a large file's digest and write it in a thread (the loop, and so
        the node's pulses and other clients, go on meanwhile)."""
        try:
            await asyncio.to_thread(self.server.store.put, message.digest, data)
        except ProtocolError as exc:
            self._refuse_file(message.digest, exc)
            return
        self._last_heard = time.monotonic()
        self._file_stored(message.digest)

    def _refuse_file(self, digest: str, exc: ProtocolError) -> None:
        """Refuse this file only; whatever needs it is told why."""
        logger.warning("refused a file from %s: %s", self.conn.peer, exc)
        self._refused_files[digest] = str(exc)

    def _file_stored(self, digest: str) -> None:
        if digest not in self._file_holds:
            self._file_holds.add(digest)
            self.server.store.hold(digest)
        for comp_id, (missing, start) in list(self._waiting_for_files.items()):
            missing.discard(digest)
            if not missing:
                del self._waiting_for_files[comp_id]
                self._spawn(start)

    def _on_file_place(self, message: FilePlace, buffers: list[memoryview]) -> None:
        computation = self._computations.get(message.comp_id)
        error = ""
        if computation is None:
            error = "the computation is not set up on this node"
        else:
            try:
                path = safe_relative_path(message.path)
                refused = self._refused_files.get(message.digest)
                if refused is not None:
                    raise ProtocolError(refused)
                self.server.store.place(message.digest, computation.path, path)
            except (ProtocolError, OSError) as exc:
                error = str(exc)
        self._write(
            FilePlaced(comp_id=message.comp_id, request=message.request, error=error)
        )

    async def _start(
        self,
        computation: Computation,
        bundle: list[memoryview],
        files: list[tuple[str, str]],
        setup_timeout: float | None,
    ) -> None:
        try:
            workers = await computation.start(bundle, files, setup_timeout)
        except SetupError as exc:
            logger.warning("computation %s failed to start: %s", computation.name, exc)
            self._computations.pop(computation.comp_id, None)
            await computation.close(terminate=True)
            self._write(
                ComputationFailed(
                    comp_id=computation.comp_id,
                    message=str(exc),
                    traceback=exc.remote_traceback,
                )
            )
            return
        logger.info(
            "computation %s of %s ready with %d workers",
            computation.name,
            self.conn.peer,
            workers,
        )
        self._write(ComputationReady(comp_id=computation.comp_id, workers=workers))

    def _on_submit(self, message: JobSubmit, buffers: list[memoryview]) -> None:
        jobs: list[NodeJob] = []
        offset = 0
        for entry in message.jobs:
            if len(entry) not in (3, 4):
                raise MessageError("malformed job entry in job-submit")
            key, attempt, count = entry[0], entry[1], entry[2]
            if not (
                isinstance(key, int)
                and isinstance(attempt, int)
                and isinstance(count, int)
            ):
                raise MessageError("malformed job entry in job-submit")
            if count < 1 or offset + count > len(buffers):
                raise MessageError("job-submit buffer counts do not match its buffers")
            job = NodeJob(key, attempt, buffers[offset : offset + count])
            if count == 1 and shm.is_reference(job.buffers):
                self._track_segment(message.comp_id, job)
            if len(entry) == 4:
                job.files = self._job_files(entry[3])
            jobs.append(job)
            offset += count
        if message.limits:
            _apply_limits(jobs, message.limits)
        if self.server.draining:  # the node shuts down: these run elsewhere
            reason = "the node is shutting down; the job did not start"
            for job in jobs:
                returned = ResultEntry.unrun(job.key, job.attempt, RETURNED, reason)
                self._queue_result(message.comp_id, returned.to_wire(), [])
            return
        computation = self._computations.get(message.comp_id)
        if computation is None:
            for job in jobs:
                self._queue_result(
                    message.comp_id,
                    ResultEntry.unrun(
                        job.key,
                        job.attempt,
                        TERMINATED,
                        "the computation is not set up on this node",
                    ).to_wire(),
                    [],
                )
            return
        computation.submit(jobs)

    def _track_segment(self, comp_id: int, job: NodeJob) -> None:
        """Remember a job's shared memory, to unlink it if the job never runs."""
        try:
            name = shm.reference_name(job.buffers[0])
        except SerializationError:
            return  # the worker refuses it and the job reports why
        self._segments.setdefault(comp_id, {})[job.key, job.attempt] = name

    def _job_files(self, entries: Any) -> list[tuple[str, str]]:
        if not isinstance(entries, list):
            raise MessageError("malformed job files in job-submit")
        files = []
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 2:
                raise MessageError("malformed job file entry in job-submit")
            self.server.store.path(entry[1])  # validates the digest
            files.append((safe_relative_path(entry[0]), entry[1]))
        return files

    def _on_cancel(self, message: JobCancel, buffers: list[memoryview]) -> None:
        computation = self._computations.get(message.comp_id)
        if computation is not None:
            computation.cancel(message.key, message.attempt, message.unstarted)

    async def hand_back(self) -> None:
        """The node shuts down: hand back the jobs that have not started, and make
        sure the client got that before the connection closes."""
        for comp_id, computation in self._computations.items():
            if comp_id not in self._recovery or comp_id in self._crash_only:
                computation.hand_back()
        self._flush()
        with contextlib.suppress(DispynbError, TimeoutError):
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await self.conn.flush()

    async def drain(self) -> None:
        """The node drains (after `hand_back`): wait for the running jobs to end and
        their results to be sent."""
        await asyncio.gather(
            *(c.wait_idle() for c in list(self._computations.values())),
            return_exceptions=True,
        )
        self._flush()
        with contextlib.suppress(DispynbError, TimeoutError):
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await self.conn.flush()

    def _on_recover(self, message: Recover, buffers: list[memoryview]) -> None:
        comp_id = message.comp_id
        # The client's message size limit (an older client's: the default); no
        # client takes less than a handshake's.
        limit = message.max_message_size or MAX_MESSAGE_SIZE
        limit = max(limit, PRE_AUTH_MAX_FRAME)
        sender = KeptResultSender(self.conn, comp_id, limit)
        claimed = self.server.keeper.claim(message.recovery_id, sender.deliver)
        self._flush()
        if claimed is None:
            self._write(Recovered(comp_id=comp_id, found=False, running=False))
            return
        kept, recorded = claimed
        self._claims.append(kept)
        self._spawn(self._send_kept(sender, kept, recorded, message.recovery_id))

    async def _send_kept(
        self,
        sender: KeptResultSender,
        kept: Kept,
        recorded: list[KeptResult],
        recovery_id: str,
    ) -> None:
        """Send the kept results (one by one, under back-pressure); drop them once
        they all are on their way."""
        try:
            await sender.run(kept, recorded)
        except DispynbError as exc:
            logger.info(
                "%s went away while recovering results: %s", self.conn.peer, exc
            )
            return  # not all sent: they stay kept for another try
        if kept.deliver == sender.deliver:  # (not a later client's)
            kept.deliver = None
        await self._release_when_sent(recovery_id)

    async def _release_when_sent(self, recovery_id: str) -> None:
        """Every kept result is collected: drop them once they are on their way."""
        self._flush()
        try:
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await self.conn.flush()
        except (DispynbError, TimeoutError):
            # A client that read everything may hang up before this task runs.
            if not self.conn.all_sent:
                return  # not sent: keep them for another try
        self.server.keeper.release(recovery_id)

    def _on_close(self, message: ComputationClose, buffers: list[memoryview]) -> None:
        waiting = self._waiting_for_files.pop(message.comp_id, None)
        if waiting is not None:
            waiting[1].close()  # its files never all arrived: it never started
        computation = self._computations.pop(message.comp_id, None)
        recovery = self._recovery.pop(message.comp_id, None)
        if recovery is not None:
            self.server.keeper.release(recovery[0])  # closed cleanly: nothing to keep
        if computation is None:
            self._write(ComputationClosed(comp_id=message.comp_id))
            return
        if message.cancel_waiting and not message.terminate:
            computation.cancel_waiting()
        self._spawn(self._close(computation, message.terminate))

    async def _close(self, computation: Computation, terminate: bool) -> None:
        await computation.close(terminate)
        self._flush()
        self._write(ComputationClosed(comp_id=computation.comp_id))

    def _computation_died(self, comp_id: int, reason: str) -> None:
        computation = self._computations.pop(comp_id, None)
        if computation is None:
            return
        self._flush()
        self._write(ComputationFailed(comp_id=comp_id, message=reason))
        self._spawn(computation.close(terminate=True))

    # -- output --------------------------------------------------------------------

    def _reporter(self, comp_id: int) -> Callable[[list[Any], list[memoryview]], None]:
        def report(entry: list[Any], buffers: list[memoryview]) -> None:
            self._queue_result(comp_id, entry, buffers)

        return report

    def _provisional_reporter(
        self, comp_id: int
    ) -> Callable[[int, int, list[memoryview]], None]:
        def report(key: int, attempt: int, buffers: list[memoryview]) -> None:
            if comp_id in self._starts:
                self._flush()  # the job's start first
            self._write(
                JobProvisional(comp_id=comp_id, key=key, attempt=attempt), buffers
            )

        return report

    def _file_reporter(
        self, comp_id: int
    ) -> Callable[[int, str, list[memoryview]], None]:
        def report(key: int, path: str, buffers: list[memoryview]) -> None:
            self._flush()  # the job's earlier results first
            self._write(FileFromNode(comp_id=comp_id, key=key, path=path), buffers)

        return report

    def _starter(self, comp_id: int) -> Callable[[int, int, float], None]:
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
                self._starts_timer = asyncio.get_running_loop().call_later(
                    START_REPORT_DELAY, self._starts_due
                )

        return started

    def _queue_result(
        self,
        comp_id: int,
        entry: list[Any],
        buffers: list[memoryview],
    ) -> None:
        if self._segments and (segments := self._segments.get(comp_id)) is not None:
            # The client reuses the object for another job: not ours to unlink.
            segments.pop((entry[0], entry[1]), None)
            if len(buffers) == 1 and shm.is_reference(buffers):  # the result's
                with contextlib.suppress(SerializationError):
                    name = shm.reference_name(buffers[0])
                    self._result_segments.setdefault(comp_id, set()).add(name)
        # Sized once, and only when there are buffers (the usual one: no generator).
        size = 0
        if buffers:
            size = (
                buffers[0].nbytes
                if len(buffers) == 1
                else sum(b.nbytes for b in buffers)
            )
            if size >= STREAM_BYTES:
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
            self._flush()  # big, or nothing else to wait for: send it now
        elif not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _stream_result(
        self, comp_id: int, entry: list[Any], buffers: list[memoryview]
    ) -> None:
        """Send a large result's buffers in chunks (views: nothing is copied), then
        its entry, marked streamed."""
        self._flush()  # the results before it first
        key, attempt = entry[0], entry[1]
        computation = self._computations.get(comp_id)
        kinds = computation.result_kinds.get(key, "") if computation else ""
        for chunk, part in split_result(
            comp_id, key, attempt, buffers, kinds, CHUNK_BYTES
        ):
            self._write(chunk, [part])
        # The entry, marked streamed (see `ResultEntry.to_wire`).
        self._write(JobResults(comp_id=comp_id, results=[[*entry, True]]))

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
            self._flush()
        else:
            self._starts_timer = asyncio.get_running_loop().call_later(
                min(rest, START_REPORT_DELAY), self._starts_due
            )

    def _flush(self) -> None:
        self._flush_pending = False
        self._oldest_start = None
        out, self._out = self._out, {}
        starts, self._starts = self._starts, {}
        for comp_id, (entries, buffers) in out.items():
            started = starts.pop(comp_id, [])
            self._write(
                JobResults(comp_id=comp_id, results=entries, started=started), buffers
            )
        for comp_id, started in starts.items():
            self._write(JobResults(comp_id=comp_id, results=[], started=started))

    def _write(self, message: Message, buffers: list[memoryview] | None = None) -> None:
        try:
            self.conn.write(message, buffers or ())
        except DispynbError as exc:
            logger.info("cannot send %s to %s: %s", message.op, self.conn.peer, exc)
            return
        if not self._held and self.conn.unsent > OUT_HIGH:
            self._hold_workers()

    def _hold_workers(self) -> None:
        """Back-pressure: the client is not taking what we send, so stop reading
        results (and output, files) from the workers until it has."""
        self._held = True
        logger.debug("%s is not reading: holding its workers", self.conn.peer)
        for computation in self._computations.values():
            computation.hold_workers(True)
        self._spawn(self._release_when_drained())

    async def _release_when_drained(self) -> None:
        try:
            await self.conn.flush()
        except DispynbError:
            return  # the connection ended: serve() closes the computations
        self._held = False
        for computation in list(self._computations.values()):
            computation.hold_workers(False)

    def _send_error(self, code: str, text: str) -> None:
        self._write(Error(code=code, message=text))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _apply_limits(jobs: list[NodeJob], limits: list[Any]) -> None:
    """Give jobs their ``[key, timeout, mem_limit]`` limits from a job-submit."""
    by_key = {job.key: job for job in jobs}
    for entry in limits:
        if not isinstance(entry, list) or len(entry) != 3:
            raise MessageError("malformed job limits in job-submit")
        key, timeout, mem_limit = entry
        job = by_key.get(key)
        if job is None:
            raise MessageError("job-submit limits name a job it does not carry")
        if timeout is not None:
            if (
                isinstance(timeout, bool)
                or not isinstance(timeout, int | float)
                or not timeout > 0
            ):
                raise MessageError("malformed job timeout in job-submit")
            job.timeout = float(timeout)
        if mem_limit is not None:
            if (
                isinstance(mem_limit, bool)
                or not isinstance(mem_limit, int)
                or mem_limit <= 0
            ):
                raise MessageError("malformed job mem_limit in job-submit")
            job.mem_limit = mem_limit
