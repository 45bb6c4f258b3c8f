"""`DriverResults`: what the driver makes of the results nodes send."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from dispynb.errors import JournalError, MessageError, SerializationError
from dispynb.jobenv import output_bytes
from dispynb.protocol import serialize, shm
from dispynb.protocol.chunks import TOO_LARGE, add_chunk, take_output, take_stream
from dispynb.protocol.framing import Buffer
from dispynb.protocol.messages import (
    CANCELLED,
    CRASHED,
    FINISHED,
    RETURNED,
    JobProvisional,
    JobResults,
    ResultChunk,
    ResultsJournaled,
)
from dispynb.protocol.records import ResultEntry
from dispynb.scheduler.events import (
    AcceptResult,
    Instruction,
    JobFinished,
    JobReturned,
    NodeJoined,
)
from dispynb.scheduler.link import (
    NodeLink,
    Outcome,
)
from dispynb.scheduler.outbox import DriverOutbox

#: The driver's logger (one name for all its parts, as users configure it).
logger = logging.getLogger("dispynb.scheduler.driver")


class DriverResults(DriverOutbox):
    """Results, provisional results and chunks of large results from nodes."""

    def _on_provisional(
        self, link: NodeLink, message: JobProvisional, buffers: list[memoryview]
    ) -> None:
        if not self.state.is_running(message.key, message.attempt, link.node_id):
            return  # from an attempt we gave up on
        try:
            result = serialize.loads(buffers, self.config.result_types)
        except SerializationError as exc:
            logger.warning("provisional result of job %d dropped: %s", message.key, exc)
            return
        self.events.job_provisional(message.key, link, result)

    def _closed_unstarted(self, link: NodeLink, key: int) -> bool:
        """Whether a job the node reports cancelled was cancelled only because
        `close_node` released the node (or `resetup_node` closed the computation
        there) before the job started there: a job merely sent ahead, neither
        pinned to the node nor cancelled by the user. As in dispy, where a node
        holds only running jobs, it then goes back to the queue (a launcher's
        scale-down drains nodes this way); after resetup_node it ended Cancelled."""
        return (link.releasing or link.resetting) and self.state.returnable(key)

    def _on_results(
        self, link: NodeLink, message: JobResults, buffers: list[memoryview]
    ) -> None:
        starts = message.started
        if not all(_well_formed_start(start) for start in starts):
            raise MessageError(f"node {link.node_id} sent a malformed job start")
        next_start = 0  # starts are replayed in the node's order among the results
        offset = 0
        instructions: list[Instruction] = []
        handle = self.state.handle
        read: list[str] = []  # results in shared memory
        # What the façade hears (starts and results, in the node's order) is told
        # last, once the jobs this frees are on their way: a result wakes the user's
        # thread, which then waits for this thread's GIL until it is done here.
        notices: list[tuple[Any, ...]] = []
        files_ended: list[tuple[int, int]] = []  # attempts that had files here?
        acked: list[list[int]] = []  # [key, attempt] of the jobs ended here
        for index, entry in enumerate(message.results):
            while next_start < len(starts) and starts[next_start][3] <= index:
                self._on_start(link, starts[next_start], notices)
                next_start += 1
            record, streamed = ResultEntry.from_wire(entry)
            key, attempt, outcome, began, ended, stdout, stderr, exception, count = (
                record
            )
            if self._segments:
                self._release_segments(key, attempt, reuse=True)
            if link.job_files:
                files_ended.append((key, attempt))
            result_buffers: list[Any] | None
            if streamed:  # its buffers (and a large output) came in chunks
                stdout, stderr, exception = take_output(
                    self._streams,
                    (link.node_id, key, attempt),
                    stdout,
                    stderr,
                    exception,
                )
                result_buffers = self._take_stream(link, key, attempt, count)
            else:
                result_buffers = buffers[offset : offset + count]
                offset += count
                if self._streams:  # chunks a node sent for it are of no use now
                    self._streams.pop((link.node_id, key, attempt), None)
            in_memory = None  # the worker's result object, if it wrote one
            if (
                link.shared_memory
                and count == 1
                and result_buffers
                and shm.is_reference(result_buffers)
                and shm.is_result_reference(result_buffers[0])
            ):
                in_memory = shm.reference_name(result_buffers[0])
                read.append(in_memory)
            if outcome == CANCELLED and self._closed_unstarted(link, key):
                # close_node, resetup_node: a job sent ahead runs elsewhere, or
                # there once set up again (its CPUs were taken back already).
                instructions.extend(
                    handle(JobReturned(link.node_id, key, attempt), dispatch=False)
                )
                continue
            if outcome == RETURNED:
                # The node shuts down: no more jobs for it; this one runs elsewhere.
                if not link.leaving:
                    link.leaving = True
                    instructions.extend(
                        handle(NodeJoined(link.node_id, 0), dispatch=False)
                    )
                instructions.extend(
                    handle(JobReturned(link.node_id, key, attempt), dispatch=False)
                )
                continue
            accepted = handle(
                JobFinished(link.node_id, key, attempt, max(ended - began, 0.0)),
                dispatch=False,  # once for the whole message, below
            )
            if not accepted or not isinstance(accepted[0], AcceptResult):
                instructions.extend(accepted)
                continue  # stale: an old attempt or a node we already gave up on
            instructions.extend(accepted[1:])
            self._jobs.pop(key, None)
            acked.append([key, attempt])
            result = None
            if outcome == FINISHED and result_buffers is None:
                outcome, exception = CRASHED, "the result arrived incomplete"
            elif outcome == FINISHED:
                try:
                    if in_memory is not None:  # read out of the worker's object
                        result = shm.load_reference(
                            result_buffers[0],  # type: ignore[index]  # not None
                            self._load_result,
                        )
                    else:
                        result = serialize.loads(
                            result_buffers,  # type: ignore[arg-type]  # not None
                            self.config.result_types,
                        )
                except SerializationError as exc:
                    outcome, exception = (
                        CRASHED,
                        f"the result cannot be unpickled here: {exc}",
                    )
            link.jobs_done += 1
            link.cpu_time += max(ended - began, 0.0)
            notices.append(
                (
                    key,
                    Outcome(
                        outcome,
                        result,
                        stdout,
                        stderr,
                        exception,
                        began,
                        ended,
                        _reported_size(result_buffers, stdout, stderr, exception),
                    ),
                )
            )
        for start in starts[next_start:]:
            self._on_start(link, start, notices)
        if files_ended:
            self._job_files_ended(link, files_ended)
        instructions.extend(self.state.dispatch())
        for name in read:  # read (or dropped, stale): ours to free
            shm.unlink(name)
        self._apply(instructions)
        events = self.events
        try:
            with events.batch():  # the ends journaled in one transaction
                for notice in notices:
                    if len(notice) == 2:
                        events.job_done(notice[0], link, notice[1])
                    else:
                        events.job_running(notice[0], link, notice[2])
        except JournalError:  # a full disk (logged): the node keeps the results
            return
        if acked and link.acks_journaled:
            # Journaled (committed as the batch ended): the node needs not keep
            # them for this client's recovery any more.
            self._post(link, ResultsJournaled(comp_id=self.config.comp_id, jobs=acked))

    def _load_result(self, buffers: list[Buffer]) -> Any:
        return serialize.loads(buffers, self.config.result_types)

    def _on_start(
        self, link: NodeLink, start: list[Any], notices: list[tuple[Any, ...]]
    ) -> None:
        """A job began executing on the node (``[key, attempt, time, before]``):
        noted in ``notices`` as ``(key, attempt, time)`` unless stale."""
        key, attempt, when = start[0], start[1], start[2]
        if not math.isfinite(when):  # no time (NaN reached the web monitor's JSON)
            return
        if self.state.is_running(key, attempt, link.node_id):  # else: stale, or done
            notices.append((key, attempt, when))

    def _on_chunk(
        self, link: NodeLink, message: ResultChunk, buffers: list[memoryview]
    ) -> None:
        """Append a chunk of a large result to its buffer (`add_chunk`)."""
        if not self.state.is_running(message.key, message.attempt, link.node_id):
            return  # not this node's job (or an attempt we gave up on): dropped
        stream_id = (link.node_id, message.key, message.attempt)
        cap = self.config.max_result or self.config.max_message_size
        # Output is kept in characters, and counted here in bytes (with its note).
        most = self.config.max_output
        output_cap = sys.maxsize if most is None else output_bytes(most)
        problem = add_chunk(self._streams, stream_id, message, buffers, cap, output_cap)
        if problem == TOO_LARGE:
            logger.warning(
                "node %s streams a result of job %d over %d bytes: refused",
                link.node_id,
                message.key,
                cap,
            )
        elif problem is not None:
            logger.warning("node %s sent a malformed result chunk", link.node_id)

    def _take_stream(
        self, link: NodeLink, key: int, attempt: int, count: int
    ) -> list[bytes | bytearray] | None:
        """The buffers of a streamed result, or None if they are not all there."""
        return take_stream(self._streams, (link.node_id, key, attempt), count)


def _reported_size(
    buffers: list[Any] | None,
    stdout: str | bytes,
    stderr: str | bytes,
    exception: str | None,
) -> int:
    """About the bytes a node's report of one job took: its result's buffers and
    its output (characters for bytes: an estimate, as a count of traffic is)."""
    size = len(stdout) + len(stderr) + len(exception or "")
    for buffer in buffers or ():
        size += memoryview(buffer).nbytes
    return size


def _well_formed_start(start: object) -> bool:
    """Whether a `JobResults.started` entry is ``[key, attempt, time, before]``."""
    return (
        isinstance(start, list)
        and len(start) >= 4
        and type(start[0]) is int
        and type(start[1]) is int
        and type(start[2]) in (int, float)
        and type(start[3]) is int
    )
