"""`ClientSession`: serves one authenticated client connection on the node.

Dispatches the client's messages (one handler per op) to its computations. Its
parts: `outbox.ResultOutbox` (results sent in batches: all results that arrive during
one turn of the event loop travel in one message per computation), `sessionmemory`
(the shared memory of its jobs), `sessionfiles` (the files it sends) and
`sessionrecovery` (results kept for a client that comes back); their shared state is
`sessionstate._SessionState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dispynb.defaults import MAX_DEST_PATH_PARTS, PULSE_RANGE
from dispynb.errors import (
    DispynbError,
    FramingError,
    MessageError,
    ProtocolError,
    SetupError,
)
from dispynb.protocol import shm
from dispynb.protocol.files import bad_dest_path, dest_path_parts
from dispynb.protocol.handshake import peer_text
from dispynb.protocol.messages import (
    RETURNED,
    TERMINATED,
    ComputationClose,
    ComputationClosed,
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    FilePlace,
    FilePut,
    FileRelease,
    FileSaved,
    FilesMissing,
    JobCancel,
    JobSubmit,
    Message,
    NodeStatus,
    Ping,
    Recover,
    ResultsJournaled,
)
from dispynb.protocol.records import ResultEntry
from dispynb.transport.connection import Connection
from dispynb.transport.inbox import BadMessageError
from dispynb.wording import counted
from nodeserver import descriptors
from nodeserver.computation import Computation, JobLimits, NodeJob
from nodeserver.monitor import avail_info
from nodeserver.outbox import CLIENT_GONE, OUT_HIGH
from nodeserver.sessionfiles import _SessionFiles
from nodeserver.sessionrecovery import _SessionRecovery
from nodeserver.sessionstate import HAND_BACK_TIMEOUT, logger

if TYPE_CHECKING:
    from nodeserver.server import NodeServer

#: Seconds between status reports when the client asks for none (no pulse_interval).
STATUS_INTERVAL = 10.0

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (never empty, never a dot name)."""
    name = _UNSAFE.sub("_", text).strip("._")[:64]
    return name or "x"


class ClientSession(_SessionFiles, _SessionRecovery):
    """One client's connection: its computations and its outgoing results."""

    def __init__(self, conn: Connection, server: NodeServer, client_name: str) -> None:
        super().__init__(conn, server, client_name)
        self._status_interval: float | None = None
        self._status_task: asyncio.Task[None] | None = None
        #: Computations being closed, with the closes they answer when closed.
        self._closing: dict[int, tuple[Computation, list[ComputationClose]]] = {}
        self._handlers: dict[type[Message], Callable[[Any, list[memoryview]], None]] = {
            ComputationSetup: self._on_setup,
            JobSubmit: self._on_submit,
            JobCancel: self._on_cancel,
            ComputationClose: self._on_close,
            FilePut: self._on_file_put,
            FilePlace: self._on_file_place,
            FileRelease: self._on_file_release,
            FileSaved: self._on_file_saved,
            Ping: self._on_ping,
            Recover: self._on_recover,
            ResultsJournaled: self._on_journaled,
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
                if deferred is not None:
                    await self._store_file_off_loop(*deferred)
                # Not held by this frame any more: a session ended by its client's
                # death keeps its frame alive (its computation kept for recovery, an
                # hour), and with it the file's whole message body.
                deferred = None
                if self._unread():
                    # The client does not take what was sent to it: what it sends
                    # waits unread (in its socket) until it has, as the answers to
                    # it (errors, recoveries not found...) piled up here without
                    # bound. (Raises once the connection ended.)
                    self._catching_up = True
                    try:
                        await self.conn.flush()
                    finally:
                        self._catching_up = False
        except (MessageError, FramingError) as exc:
            # A message whose parts disagree cannot be trusted (nor what follows
            # it), a frame this node cannot take (out of memory) leaves the stream
            # unusable: say why before the connection ends, so the client can
            # report it.
            await self._refuse(exc)
            raise
        finally:
            await self._end_session()

    async def _end_session(self) -> None:
        """The connection ended: the keeper adopts the computations their client
        may come back to; the others close; what they held is freed."""
        self._end_claims()
        closing = [
            computation
            for comp_id, computation in self._computations.items()
            if not self._keeper_adopts(comp_id, computation)
        ]
        adopted = [c for c in self._computations.values() if c not in closing]
        for computation in self._computations.values():
            # Its jobs' files get no answer; an adopted one keeps them for recovery.
            computation.client_lost(CLIENT_GONE, keep=computation in adopted)
        self._computations.clear()
        self._keeper_adopts_the_dead()
        await asyncio.gather(
            *(c.close(terminate=True) for c in closing), return_exceptions=True
        )
        self.memory.release(closing, adopted)
        self._end_files()
        self.outbox.report_lost()  # the closed computations' results included
        for task in self._tasks:
            task.cancel()

    async def _refuse(self, exc: ProtocolError) -> None:
        """Tell the client why its connection ends (best effort, bounded)."""
        if self.conn.closed:
            return
        self.outbox.flush()  # results already queued go first
        self.outbox.send_error(
            "protocol", f"{peer_text(exc)}: the node closes this connection"
        )
        with contextlib.suppress(DispynbError, TimeoutError):
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await self.conn.flush()

    # -- handlers ------------------------------------------------------------------

    def _on_bad_message(self, error: BadMessageError) -> None:
        """A message this node does not understand: say so (not to a client that
        does not read what it is sent: counted only); the session goes on."""
        text = peer_text(error)
        self._log_refusal(text)
        if self._unread():
            return
        self.outbox.send_error(
            "protocol",
            f"{text}: ignored (are client and node the same dispynb version?)",
        )

    def _on_message(self, message: Message, buffers: list[memoryview]) -> bool:
        """Handle one message; True stops the dispatch (a file to store off the
        loop first, or the client does not read: `_unread`)."""
        self._last_heard = time.monotonic()
        handler = self._handlers.get(type(message))
        if handler is None:
            self._log_refusal(f"unexpected message {message.op!r}")
            self.outbox.send_error("protocol", f"unexpected message {message.op!r}")
        else:
            handler(message, buffers)
        return self._deferred_file is not None or self._unread()

    def _unread(self) -> bool:
        """The client has not taken `OUT_HIGH` bytes sent to it (its workers are
        held: `ResultOutbox`), or many small messages (`Connection.unread`):
        `serve` reads none of its messages until it has."""
        return self.conn.unread(OUT_HIGH)

    def _log_refusal(self, text: str) -> None:
        """Log a message of the client the node cannot use: the first, then a
        count (`Tally`): a line each let a client grow the node's log at will."""
        self.server.message_refusals.event(
            "messages this node cannot use", str(self.conn.peer), text
        )

    def _on_setup(self, message: ComputationSetup, buffers: list[memoryview]) -> None:
        if message.comp_id in self._computations:
            self.outbox.send_error("protocol", f"computation {message.comp_id} exists")
            return
        bad = (
            message.bad_seconds()
            or bad_dest_path(message.dest_path, MAX_DEST_PATH_PARTS + 1)
            or _other_python(message, self.server.config.name)
        )
        if bad is not None:
            self.outbox.write(ComputationFailed(comp_id=message.comp_id, message=bad))
            return
        name = peer_text(message.name)
        short = self.server.descriptors.refuse(name, self._workers(message))
        if short is not None:  # refused before it takes any (see descriptors)
            self.outbox.write(ComputationFailed(comp_id=message.comp_id, message=short))
            return
        computation = self._new_computation(message)
        self.outbox.client_limit(message.comp_id, message.max_message_size)
        self._keep_results(message, computation)
        self._computations[message.comp_id] = computation
        if self.outbox.held:
            computation.hold_workers(True)
        try:
            files = self._check_files(message.files)
        except ProtocolError as exc:
            self._setup_refused(message, str(exc))
            return
        missing = {
            digest for _, digest, _ in files if not self.server.store.has(digest)
        }
        for _, digest, _ in files:
            if digest not in missing:  # from the store's cache: held before use
                self._hold_file(digest)
        try:
            sizes = {e[1]: e[2] for e in message.files if e[1] in missing}
            self._check_quota(sum(sizes.values()), "the computation's files")
        except ProtocolError as exc:
            self._setup_refused(message, str(exc))
            return
        start = self._start(computation, buffers, files, message.setup_timeout)
        self._start_status_reports(message.pulse_interval)
        if not missing:
            self._spawn(start)
            return
        self._waiting_for_files[message.comp_id] = (missing, start)
        # In messages its client takes (one asking for 60,000 files is 3.9 MB).
        self.outbox.write_fit(
            message.comp_id,
            FilesMissing(comp_id=message.comp_id, digests=sorted(missing)),
        )

    def _setup_refused(self, message: ComputationSetup, why: str) -> None:
        """A computation set up is refused before it starts (a node limit): nothing
        of it stays. Logged: the node's admin sees what its limits refuse, not only
        the client."""
        # The first of a client, then counts (`Tally`): a line each let a client
        # grow the node's log at will (3,000 setups, 3,000 lines).
        self.server.message_refusals.event(
            "refused computations",
            str(self.conn.peer),
            f"{peer_text(message.name)!r} of client {self.client_name!r}: {why}",
        )
        comp_id = message.comp_id
        self._computations.pop(comp_id, None)
        self._forget_results(comp_id)
        self.outbox.write(ComputationFailed(comp_id=comp_id, message=why))

    def _workers(self, message: ComputationSetup) -> int:
        """The workers the computation ``message`` sets up gets here."""
        cpus = self.server.config.cpus
        return cpus if message.workers <= 0 else min(message.workers, cpus)

    def _new_computation(self, message: ComputationSetup) -> Computation:
        """The computation ``message`` sets up, in its own directory, reporting to
        this session."""
        config = self.server.config
        workers = self._workers(message)
        client_dir = (
            f"{safe_name(self.client_name or 'client')}-{os.getpid()}-{self.session_id}"
        )
        if message.dest_path:
            parts = [safe_name(p) for p in dest_path_parts(message.dest_path)]
            comp_dir = os.path.join(*parts) if parts else "default"
            # As dispy's <prefix>/<client address>/<dest_path>: the same directory
            # for every cluster of that client giving it, so that the files one
            # leaves there (cleanup=False) are the next one's. (A Unix socket's
            # client is on this host.)
            peer = self.conn.peer_address
            client_dir = safe_name(peer[0] if peer else "127.0.0.1")
        else:
            comp_dir = f"{safe_name(message.name)}-{message.comp_id}"
        home = os.path.join(config.dest_path, client_dir)
        computation = Computation(
            comp_id=message.comp_id,
            # Escaped and cut: the node logs it (a scheduler's users are not to
            # forge lines in its log, nor fill it with one name of megabytes).
            name=peer_text(message.name),
            workers=workers,
            path=os.path.join(home, comp_dir),
            budget=self.server.budget,
            report=self._reporter(message.comp_id),
            report_provisional=self.outbox.provisional_reporter(message.comp_id),
            report_file=self.outbox.file_reporter(message.comp_id),
            store=self.server.store,
            refused_files=self._refused_files,
            node_name=config.name,
            node_address=self._local_ip(),
            max_message_size=config.max_message_size,
            remove_path=message.cleanup or config.force_cleanup,
            home=home,
            removals=self.server.removals,
            path_users=self.server.path_users,
            limits=JobLimits(
                max_output=message.max_output,
                max_result=message.max_result,
                max_pids=message.max_pids,
                fresh_process=message.fresh_process,
                max_message=message.max_message_size or None,
            ),
            node_stopping=lambda: self.server.draining,
            launcher=self.server.launcher,
        )
        computation.on_failure = lambda reason: self._computation_died(
            message.comp_id, reason
        )
        computation.on_start = self.outbox.starter(message.comp_id)
        computation.on_shutdown_request = lambda: self.server.client_shutdown(
            f"computation {computation.name!r} of client {self.client_name!r}"
        )
        return computation

    def _start_status_reports(self, interval: float | None) -> None:
        """Report the node's resources every ``interval`` s (the shortest asked for).

        The client's wish is held to `PULSE_RANGE`, as `JobCluster` checks it: a
        client asking for a pulse every microsecond would have the node spin."""
        if (
            not interval
            or not isinstance(interval, int | float)
            or math.isnan(interval)
        ):
            interval = STATUS_INTERVAL
        interval = min(max(interval, PULSE_RANGE[0]), PULSE_RANGE[1])
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
            self._heard_as_it_reads()
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
            if self.conn.unsent:
                # The client has not taken what was sent: it hears from the node
                # once it reads; a pulse each time would pile up without end for
                # a client that never reads.
                continue
            avail = avail_info(self.server.config.dest_path)
            self.outbox.write(NodeStatus(avail=avail))

    def _heard_as_it_reads(self) -> None:
        """A client whose messages wait unread (`serve`, after `_unread`: its
        pings too) is alive while it takes what is sent to it: on a slow link,
        catching up on 32 MiB of results took longer than --orphan-timeout, and
        the node freed the computations of a client that pinged all along. One
        that takes nothing more (stopped, cut off) is silent, as ever. What the
        client's kernel took counts (`Connection.untaken_bytes`, as the scheduler
        counts it): the node's kernel takes more of it only once a third of its
        buffer (megabytes) is free, half a minute apart at 40 KB/s."""
        conn = self.conn
        taken = conn.bytes_sent - conn.unsent - conn.untaken_bytes()
        if taken > self._taken and self._catching_up:
            self._last_heard = time.monotonic()
        self._taken = taken

    def _on_ping(self, message: Ping, buffers: list[memoryview]) -> None:
        """The client is alive (recorded for every message received)."""

    def _local_ip(self) -> str:
        """This node's IP address as its client reached it (dispy_node_ip_addr)."""
        address = self.conn.local_address
        if address is not None:
            return address[0]
        return self.server.config.host

    async def _start(
        self,
        computation: Computation,
        bundle: list[memoryview],
        files: list[tuple[str, str, bool]],
        setup_timeout: float | None,
    ) -> None:
        try:
            try:
                workers = await computation.start(bundle, files, setup_timeout)
            except OSError as exc:  # no descriptor, no process to be had
                what = "cannot start the computation's process"
                raise SetupError(descriptors.explain(exc, what)) from exc
            except SetupError:
                raise
            except Exception as exc:  # a fault of the node's: its client must hear
                logger.exception("computation %s failed to start", computation.name)
                raise SetupError(
                    f"the node failed to start the computation: {exc!r}"[:500]
                ) from exc
        except SetupError as exc:
            # Closed meanwhile (its client went away, the node stops), or the
            # client's own code failed here (its setup raised, its computation does
            # not load: a traceback): the client is told; not the node's fault, and
            # a %dispy local node's warning would repeat it in the notebook's cell.
            quiet = computation.closing or bool(exc.remote_traceback)
            log = logger.info if quiet else logger.warning
            log("computation %s failed to start: %s", computation.name, exc)
            closed = computation.comp_id not in self._computations  # by _on_close
            self._computations.pop(computation.comp_id, None)
            # It never ran a job: no result to keep (were it kept, the keeper
            # would hold it, and its spool directory, for as long as the node runs).
            self._forget_results(computation.comp_id)
            await computation.close(terminate=True)
            if closed and computation.closing and not self.server.draining:
                return  # its client closed it: `_close` answers ComputationClosed
            self.outbox.write(
                ComputationFailed(
                    comp_id=computation.comp_id,
                    message=str(exc),
                    traceback=exc.remote_traceback,
                )
            )
            return
        logger.info(
            "computation %s of %s ready with %s",
            computation.name,
            self.conn.peer,
            counted(workers, "worker"),
        )
        self.outbox.write(
            ComputationReady(
                comp_id=computation.comp_id,
                workers=workers,
                acks_journaled=self._acks_journaled(computation.comp_id),
            )
        )

    def _on_submit(self, message: JobSubmit, buffers: list[memoryview]) -> None:
        jobs: list[NodeJob] = []
        offset = 0
        via_memory = False  # a job's arguments came through shared memory
        for entry in message.jobs:
            if not isinstance(entry, list) or len(entry) not in (3, 4):
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
                self.memory.track_job(message.comp_id, job)
                via_memory = True
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
        if via_memory:  # so may its results: see `nodeserver.resultobjects`
            computation.result_objects.used = True
        computation.submit(jobs)

    def _on_file_saved(self, message: FileSaved, buffers: list[memoryview]) -> None:
        computation = self._computations.get(message.comp_id)
        if computation is not None:
            computation.file_saved(message.request, peer_text(message.error, 2000))

    def _on_cancel(self, message: JobCancel, buffers: list[memoryview]) -> None:
        computation = self._computations.get(message.comp_id)
        if computation is not None:
            computation.cancel(message.key, message.attempt, message.unstarted)

    async def hand_back(self, why: str) -> None:
        """The node shuts down (``why``, for the client): say so, hand back the jobs
        that have not started, and make sure the client got that before the
        connection closes."""
        avail = avail_info(self.server.config.dest_path)
        # Starts held to ride on results go first: a scheduler closes its connection
        # to a leaving node at once, and would never hear that those jobs ran here.
        self.outbox.flush()
        self.outbox.write(NodeStatus(avail=avail, leaving=why))
        for comp_id, computation in self._computations.items():
            if not self._recovers(comp_id):
                computation.hand_back()
        self.outbox.flush()
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
        self.outbox.flush()
        with contextlib.suppress(DispynbError, TimeoutError):
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await self.conn.flush()

    def _on_close(self, message: ComputationClose, buffers: list[memoryview]) -> None:
        closing = self._closing.get(message.comp_id)
        if closing is not None:
            # Closing already (a second close_node): answered as it ends; with
            # terminate, its running jobs are cancelled now, as dispy's node does.
            closing[1].append(message)
            if message.terminate:
                closing[0].terminate_running_now()
            return
        self._stop_waiting_for_files(message.comp_id)
        computation = self._computations.pop(message.comp_id, None)
        self._forget_results(message.comp_id)
        if computation is None:
            if not self._close_recovered(message.comp_id, message.terminate):
                self.outbox.write(ComputationClosed(comp_id=message.comp_id))
            return
        if message.cancel_waiting:  # close_node
            computation.cancel_waiting()
            if message.terminate:  # its running jobs end Terminated, as dispy's
                computation.terminate_running()
        self._closing[message.comp_id] = (computation, [])
        self._spawn(self._close(computation, message.terminate))

    async def _close(self, computation: Computation, terminate: bool) -> None:
        comp_id = computation.comp_id
        try:
            await computation.close(terminate)
        finally:
            _, more = self._closing.pop(comp_id)
        self.outbox.flush()
        for _ in range(1 + len(more)):  # each close is answered
            self.outbox.write(ComputationClosed(comp_id=comp_id))

    def _computation_died(self, comp_id: int, reason: str) -> None:
        computation = self._computations.pop(comp_id, None)
        if computation is None:
            return
        self.outbox.flush()
        self.outbox.write(ComputationFailed(comp_id=comp_id, message=reason))
        self._spawn(computation.close(terminate=True))

    # -- results -------------------------------------------------------------------

    def _reporter(self, comp_id: int) -> Callable[[list[Any], list[memoryview]], None]:
        def report(entry: list[Any], buffers: list[memoryview]) -> None:
            self._queue_result(comp_id, entry, buffers)

        return report

    def _queue_result(
        self,
        comp_id: int,
        entry: list[Any],
        buffers: list[memoryview],
    ) -> None:
        self.memory.reported(comp_id, entry)
        self.outbox.queue_result(comp_id, entry, buffers)


def _apply_limits(jobs: list[NodeJob], limits: list[Any]) -> None:
    """Give jobs their ``[key, timeout, mem_limit]`` limits from a job-submit."""
    by_key = {job.key: job for job in jobs}
    for entry in limits:
        if not isinstance(entry, list) or len(entry) != 3 or type(entry[0]) is not int:
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


def _other_python(message: ComputationSetup, name: str) -> str | None:
    """Why this node cannot run ``message``'s compiled code (a client on another
    Python version, major.minor, says so in ``python``); None if it can. A client
    connecting directly refuses such a node itself; one going through a shared
    scheduler learns it from here, by way of the scheduler."""
    ours = platform.python_version()
    if not message.python or ours.startswith(f"{message.python}."):
        return None
    theirs = message.python
    return (
        f"node {name!r} runs Python {ours} and the client Python "
        f"{theirs}: functions defined in the client's program travel as compiled "
        f"code, which only Python {theirs} runs. Run the client and the nodes with "
        f"the same Python version (start dispynb-node with a Python {theirs})"
    )
