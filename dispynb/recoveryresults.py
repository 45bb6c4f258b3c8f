"""How `recover_jobs` applies what a node (or a shared scheduler) sends about kept
jobs: results (whole, or assembled from chunks), start times, and where a scheduler
ran each job."""

from __future__ import annotations

import logging
from typing import Any

from dispynb.errors import ConfigurationError, MessageError, SerializationError
from dispynb.job import DispyJob
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
    JobResults,
    JobsPlaced,
    ResultChunk,
    SchedulerNodes,
)
from dispynb.protocol.records import ResultEntry, SharedNodeEntry, is_start
from dispynb.status import status_of
from dispynb.transport.addressing import parse_address

logger = logging.getLogger("dispynb.recovery")


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
