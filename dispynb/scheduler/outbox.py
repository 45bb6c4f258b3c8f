"""`DriverOutbox`: what the driver writes to nodes (jobs, cancels, files)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
from typing import Any

from dispynb.depends import FileRef
from dispynb.errors import DispynbError
from dispynb.objects import is_object_file
from dispynb.protocol import shm
from dispynb.protocol.framing import Buffer, buffers_size
from dispynb.protocol.messages import (
    FilePlace,
    FilePut,
    FileRelease,
    JobCancel,
    JobSubmit,
    Message,
    NodeManage,
    NodeManaged,
)
from dispynb.protocol.shmpool import SegmentPool
from dispynb.scheduler.events import (
    AbandonJob,
    CancelQueued,
    CancelRunning,
    DropQueued,
    Instruction,
    ResubmitJob,
    SendJobs,
)
from dispynb.scheduler.link import (
    BATCH_BYTES,
    CLOSE_TIMEOUT,
    DriverConfig,
    JobEvents,
    NodeLink,
    _Handler,
    _Pending,
)
from dispynb.scheduler.state import SchedulerState, attempts_spent
from dispynb.secret import is_credential
from dispynb.transport.connection import describe_error

#: The driver's logger (one name for all its parts, as users configure it).
logger = logging.getLogger("dispynb.scheduler.driver")


#: Bytes per second a busy node is assumed to digest and store a file at (a 100 MB
#: file gives its pulses 4 s more before the node is declared dead).
FILE_CHECK_RATE = 25_000_000

#: Jobs with large arguments a node that takes them through shared memory may hold,
#: per CPU: one running, one ready behind it (`DriverOutbox._limit_shared_memory`).
SHM_JOBS_PER_CPU = 2


class DriverOutbox:
    """The driver's writing side: carries out the scheduler's instructions (job
    batches per node, cancels), files and shared memory, in wire order."""

    # Set by `Driver.__init__` (see there).
    config: DriverConfig
    events: JobEvents
    state: SchedulerState
    nodes: dict[str, NodeLink]
    _jobs: dict[int, _Pending]
    _files: dict[str, FileRef]
    _placements: dict[int, asyncio.Future[str]]
    _managing: dict[int, asyncio.Future[NodeManaged]]
    _streams: dict[tuple[str, int, int], dict[int, list[Any]] | None]
    _requests: itertools.count[int]
    _segments: dict[int, dict[int, str]]
    _pool: SegmentPool | None
    _large: bool
    _connecting: int
    _reconnecting: int
    discovering: bool
    released: set[str]
    _watchdog: asyncio.Task[None] | None
    pulse: float
    last_error: DispynbError | None
    revoked: str
    _closing: bool
    _tasks: set[asyncio.Task[Any]]
    _routes: dict[type[Message], _Handler]

    def _send_files(self, link: NodeLink, files: list[FileRef]) -> None:
        """Send each file not yet sent on this connection (the node keeps them).

        Files are read (and checked against their digest) on a worker thread, never
        on the loop: `_pump` sends them in order, and what is `_post`-ed meanwhile
        (the jobs that need them) follows them on the wire.
        """
        for ref in files:
            if ref.digest in link.sent:
                continue
            link.sent.add(ref.digest)  # sent, or on its way
            self._files.setdefault(ref.digest, ref)
            link.outbox.append(ref)
        if link.outbox and not link.pumping:
            link.pumping = True
            self._spawn(self._pump(link))

    def _job_files_sent(
        self, link: NodeLink, key: int, attempt: int, files: list[FileRef]
    ) -> None:
        """Count the job's own files as needed on ``link`` until the attempt ends."""
        needed = [
            ref.digest
            for ref in files
            if ref.digest not in link.setup_files and not is_object_file(ref.relative)
        ]
        if needed and (key, attempt) not in link.job_files:
            link.job_files[key, attempt] = needed
            link.file_uses.need(needed)

    def _job_files_ended(self, link: NodeLink, ended: list[tuple[int, int]]) -> None:
        """These job attempts ended on ``link``: tell its node which of their files
        no job sent there needs any more (so that a long computation's per-job
        files do not pile up on the node, nor count in its transfer quota for
        ever). They are sent again if a later job needs them."""
        released = link.file_uses.done(
            digest for job in ended for digest in link.job_files.pop(job, ())
        )
        link.sent.difference_update(released)
        if released and link.conn is not None and not link.conn.closed:
            with contextlib.suppress(DispynbError):
                self._post(link, FileRelease(digests=released))

    def _post(
        self, link: NodeLink, message: Message, buffers: list[Buffer] | None = None
    ) -> None:
        """Write ``message`` to a node after the files on their way to it.

        Raises `DispynbError` (from the connection) only when written at once.
        """
        if link.pumping:
            link.outbox.append((message, buffers or []))
            return
        assert link.conn is not None
        link.conn.write(message, buffers or ())

    async def _pump(self, link: NodeLink) -> None:
        """Write a node's outbox in order, reading its files off the loop."""
        loop = asyncio.get_running_loop()
        outbox = link.outbox
        try:
            while outbox:
                item = outbox.popleft()
                if isinstance(item, FileRef):
                    try:
                        data = await loop.run_in_executor(None, item.read)
                    except (OSError, DispynbError) as exc:
                        link.sent.discard(item.digest)
                        logger.warning(
                            "cannot send %s to node %s: %s (the jobs that need it "
                            "fail there)",
                            item.path,
                            link.node_id,
                            describe_error(exc),
                        )
                        continue
                    message: Message = FilePut(digest=item.digest, size=len(data))
                    buffers: list[Buffer] = [data]
                    # The node checks the file's digest and stores it before it
                    # reads on: a large file holds its pulses back that long.
                    link.last_seen = max(
                        link.last_seen, loop.time() + len(data) / FILE_CHECK_RATE
                    )
                else:
                    message, buffers = item
                conn = link.conn
                if conn is None or conn.closed:
                    break  # its reader ends and settles the node's jobs
                with contextlib.suppress(DispynbError):
                    conn.write(message, buffers)
        finally:
            link.pumping = False
            outbox.clear()

    async def send_file(self, node_id: str, ref: FileRef) -> str:
        """Put a file into the computation's directory on a node; '' or an error.

        On a node being set up again (`resetup_node`) it goes with that setup,
        as it would to dispy's node, which kept the computation's directory."""
        link = self.nodes.get(node_id)
        if link is None or link.conn is None:
            return f"node {node_id} is not ready"
        if link.releasing:
            return f"node {node_id} is being released (close_node)"
        if link.resetting:  # its close goes on: the setup again takes it
            link.placed[ref.relative] = ref
            return ""
        # Set up (again) just now, its setup on the wire: the file follows it.
        if not (link.ready or (link.setting_up and link.welcome is not None)):
            return f"node {node_id} is not ready"
        request = next(self._requests)
        placed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._placements[request] = placed
        try:
            self._send_files(link, [ref])
            self._post(
                link,
                FilePlace(
                    comp_id=self.config.comp_id,
                    request=request,
                    path=ref.relative,
                    digest=ref.digest,
                    executable=ref.executable,
                ),
            )
            async with asyncio.timeout(CLOSE_TIMEOUT):
                error = await placed
        except (DispynbError, OSError, TimeoutError) as exc:
            return f"cannot send {ref.relative} to {node_id}: {describe_error(exc)}"
        finally:
            self._placements.pop(request, None)
        if not error:
            link.placed[ref.relative] = ref
        return error

    async def manage_node(
        self,
        link: NodeLink,
        node: str,
        action: str,
        cpus: int = 0,
        terminate: bool = False,
    ) -> tuple[str, int]:
        """Ask the shared scheduler of ``link`` to apply ``action`` (a `NodeManage`
        one it takes, with its ``cpus`` and ``terminate``) to ``node`` for this
        computation; '' or why it did not, and the CPUs it answered."""
        request = next(self._requests)
        answer: asyncio.Future[NodeManaged] = asyncio.get_running_loop().create_future()
        self._managing[request] = answer
        try:
            self._post(
                link,
                NodeManage(
                    comp_id=self.config.comp_id,
                    request=request,
                    node=node,
                    action=action,
                    cpus=cpus,
                    terminate=terminate,
                ),
            )
            async with asyncio.timeout(CLOSE_TIMEOUT):
                managed = await answer
        except (DispynbError, OSError, TimeoutError) as exc:
            why = f"no answer from the scheduler {link.node_id}: {describe_error(exc)}"
            return why, -1
        finally:
            self._managing.pop(request, None)
        return managed.error, managed.cpus

    def _apply(
        self,
        instructions: list[Instruction],
        lost_reason: str = "",
        stopped: bool = False,
    ) -> None:
        """Carry out instructions; job batches are merged per node into one message.

        A job abandoned with its node gets ``lost_reason``, as the node's own words
        if it ``stopped`` (it said it shut down)."""
        batches: dict[str, list[tuple[int, int]]] = {}
        for instruction in instructions:
            if isinstance(instruction, SendJobs):
                batches.setdefault(instruction.node, []).extend(instruction.jobs)
            elif isinstance(instruction, CancelQueued):
                self._jobs.pop(instruction.key, None)
                self._release_segments(instruction.key)
                self.events.job_cancelled(instruction.key)
            elif isinstance(instruction, DropQueued):
                for key in instruction.keys:
                    self._jobs.pop(key, None)
                    self._release_segments(key)
                self.events.jobs_cancelled(list(instruction.keys))
            elif isinstance(instruction, CancelRunning):
                link = self.nodes.get(instruction.node)
                if link is not None and link.conn is not None:
                    cancel = JobCancel(
                        comp_id=self.config.comp_id,
                        key=instruction.key,
                        attempt=instruction.attempt,
                        unstarted=instruction.unstarted,
                    )
                    # If the connection is going, NodeLeft settles the job.
                    with contextlib.suppress(DispynbError):
                        self._post(link, cancel)
            elif isinstance(instruction, AbandonJob):
                self._jobs.pop(instruction.key, None)
                self._release_segments(instruction.key)
                link = self.nodes.get(instruction.node)
                # Behind a shared scheduler, the "node" lost is the scheduler.
                peer = "scheduler" if is_credential(self.config.secret) else "node"
                if self.revoked:  # the scheduler's words: no node was lost
                    reason = self.revoked
                elif stopped:
                    reason = f"{peer} {instruction.node} stopped: {lost_reason}"
                else:
                    reason = (
                        f"{peer} {instruction.node} was lost ({lost_reason or 'left'})"
                    )
                if instruction.lost_on:
                    reason = attempts_spent(instruction.lost_on, reason)
                self.events.job_abandoned(
                    instruction.key, link, reason, node_id=instruction.node
                )
            elif isinstance(instruction, ResubmitJob):
                self._release_segments(instruction.key)  # sent again, anew
                logger.debug(  # (a line a job: dispy's says it at debug too)
                    "resubmitting job %d (attempt %d)",
                    instruction.key,
                    instruction.attempt,
                )
                self.events.job_requeued(instruction.key)
        for node_id, jobs in batches.items():
            self._send_jobs(node_id, jobs)

    def job_bytes(self, key: int) -> int:
        """Bytes of job ``key``'s arguments and own files as they are sent (0 once
        it ended): what a shared scheduler sends on to the node it picks."""
        pending = self._jobs.get(key)
        if pending is None:
            return 0
        files = sum(ref.size for ref in pending.files or ())
        return buffers_size(pending.buffers) + files

    def _send_jobs(self, node_id: str, jobs: list[tuple[int, int]]) -> None:
        link = self.nodes[node_id]
        assert link.conn is not None
        entries: list[list[Any]] = []
        limits: list[list[Any]] = []
        pins: list[list[Any]] = []
        buffers: list[Buffer] = []
        size = 0
        self.events.jobs_sent([key for key, _attempt in jobs], link)
        for key, attempt in jobs:
            pending = self._jobs[key]
            if pending.limits is not None:
                limits.append([key, *pending.limits])
            if pending.pin is not None:
                pins.append([key, pending.pin])
            payload = pending.buffers
            nbytes = buffers_size(payload)
            if link.shared_memory and nbytes >= shm.MIN_SIZE:
                payload = self._to_shared_memory(link, key, attempt, payload)
            if pending.files:
                self._send_files(link, pending.files)
                files = [file_entry(ref) for ref in pending.files]
                entries.append([key, attempt, len(payload), files])
                self._job_files_sent(link, key, attempt, pending.files)
            else:
                entries.append([key, attempt, len(payload)])
            buffers.extend(payload)
            # Arguments in shared memory count at their full size too: the node
            # then gets each large job as soon as it is written, not all at the end.
            size += nbytes
            if size >= BATCH_BYTES:
                self._write_batch(link, entries, buffers, limits, pins)
                entries, limits, pins, buffers, size = [], [], [], [], 0
        if entries:
            self._write_batch(link, entries, buffers, limits, pins)

    def _to_shared_memory(
        self, link: NodeLink, key: int, attempt: int, payload: list[Buffer]
    ) -> list[Buffer]:
        """Write a job's arguments to shared memory; the reference to send instead
        (the arguments themselves if that fails: the socket still works)."""
        try:
            name, reference = self._segment_pool().write(payload)
        except OSError as exc:
            # No room (/dev/shm small or full): this job goes over the socket, later
            # ones try again. Anything else: this node's jobs use the socket.
            no_room = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            if not no_room:
                link.shared_memory = False
            if not link.shared_memory_refused:  # said once per node
                link.shared_memory_refused = True
                logger.warning(
                    "cannot write a job's arguments to shared memory (%s) for node "
                    "%s: %s; %s over the connection instead. Give %s more room"
                    " (docker run --shm-size=1g, say) or set DISPYNB_SHARED_MEMORY=0",
                    shm.SHM_DIR,
                    link.node_id,
                    exc.strerror or exc,
                    "the jobs it cannot hold go" if no_room else "its jobs go",
                    shm.SHM_DIR,
                )
            return payload
        self._segments.setdefault(key, {})[attempt] = name
        return [reference]

    def _segment_pool(self) -> SegmentPool:
        """The computation's segment pool, made (and dead clients' objects swept)
        when the first node it can serve joins, not on the first large job's way."""
        if self._pool is None:
            self._pool = SegmentPool()
            shm.sweep()  # objects of clients that were killed
        return self._pool

    def _limit_shared_memory(self, large: bool) -> None:
        """Jobs with large arguments: nodes that take them through shared memory
        hold at most `SHM_JOBS_PER_CPU` per CPU, so that the pool's segments of
        finished jobs are reused (rewriting mapped pages costs the client about a
        tenth of fresh ones)."""
        self._large = large
        for link in self.nodes.values():
            if link.shared_memory:
                cap = SHM_JOBS_PER_CPU * max(1, link.cpus) if large else None
                self.state.limit_window(link.node_id, cap)

    def _release_segments(
        self, key: int, attempt: int | None = None, reuse: bool = False
    ) -> None:
        """Give back the shared memory of a job (of one attempt) that ended: to the
        pool if ``reuse`` (its worker is done with it), unlinked otherwise."""
        segments = self._segments.get(key)
        if segments is None:
            return
        names = list(segments.values()) if attempt is None else []
        if attempt is not None and (name := segments.pop(attempt, None)):
            names.append(name)
        if attempt is None or not segments:
            del self._segments[key]
        if self._pool is not None:
            for name in names:
                self._pool.release(name, reuse)

    def _write_batch(
        self,
        link: NodeLink,
        entries: list[list[Any]],
        buffers: list[Buffer],
        limits: list[list[Any]],
        pins: list[list[Any]],
    ) -> None:
        assert link.conn is not None
        # If the connection is going, its reader sees it end and the state requeues
        # or abandons these jobs.
        try:  # noqa: SIM105 - no context manager per job
            self._post(
                link,
                JobSubmit(
                    comp_id=self.config.comp_id, jobs=entries, limits=limits, pins=pins
                ),
                buffers,
            )
        except DispynbError:
            pass

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def file_entry(ref: FileRef, *more: Any) -> list[Any]:
    """A file's entry in a node's file lists: ``[relative_path, digest, *more]``,
    then ``True`` for a program (kept executable on the node, as dispy kept a sent
    file's mode). A file that is no program has no such item, so that a node that
    predates it takes the entry."""
    entry: list[Any] = [ref.relative, ref.digest, *more]
    if ref.executable:
        entry.append(True)
    return entry
