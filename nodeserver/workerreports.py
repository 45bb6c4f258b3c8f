"""What a `Computation`'s workers report of their jobs, read on their sockets.

A job's end (`Done`) settles it: its result entry goes to the client (or the
job runs again elsewhere, or ends as its cancel or its stop says), its worker
takes the next job or is retired; a provisional result goes on within its
client's limit; a file a job sends is `nodeserver.jobfiles`'. What the worker
reported is read in its socket's read callback (`Connection.dispatch`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from dispynb.errors import ConnectionClosedError, DispynbError
from dispynb.jobenv import NOTE_BYTES, output_limit
from dispynb.protocol.messages import CANCELLED, FINISHED, RAISED, Message
from dispynb.protocol.records import ResultEntry
from nodeserver.compstate import NodeJob, Worker, _ComputationState
from nodeserver.ipc import Done, NodeShutdown, Provisional, SendFile
from nodeserver.jobreasons import channel_reason
from nodeserver.jobtexts import (
    CLOCK_SLACK,
    entry_texts,
    own_times,
    texts_after,
    was_interrupted,
)
from nodeserver.sharedbody import BODIES

#: Seconds a worker gets to skip a cancelled job sent ahead to it, before the job is
#: taken to have started and is interrupted.
SKIP_GRACE = 0.5


class _WorkerReports(_ComputationState):
    """A `Computation`'s part that reads and settles what its workers report."""

    async def _read_worker(self, worker: Worker) -> None:
        def handle(message: Message, buffers: list[memoryview]) -> None:
            if isinstance(message, Done):
                self._on_done(worker, message, buffers)
            elif isinstance(message, Provisional):
                self._on_provisional(worker, message, buffers)
            elif isinstance(message, SendFile):
                self._on_send_file(worker, message, buffers)
            elif isinstance(message, NodeShutdown):
                self._shutdown_requested()
            if worker.look_on_read:  # its answers were waiting: see `_look_again`
                worker.look_on_read = False
                self._steal_soon()

        try:
            # Messages are handled in the socket's read callback: no task switch.
            await worker.conn.dispatch(handle)
        except ConnectionClosedError:
            pass
        except DispynbError as exc:
            # Not a message (a job wrote to the channel): the worker cannot go on
            # with this stream, nor its job; said so, not as an exit of its own.
            worker.channel_error = channel_reason(str(exc))
            worker.process.signal(signal.SIGKILL)
        finally:
            worker.stream_closed = True
            worker.conn.close()
            self._maybe_lost(worker)

    def _on_provisional(
        self, worker: Worker, message: Provisional, buffers: list[memoryview]
    ) -> None:
        head = worker.assigned[0] if worker.assigned else None
        if head is None or head.key != message.key or head.reported:
            return  # from a job already settled (cancelled): drop it
        if head.start_held:
            self._runs_after_all(head, time.time())
        size, cap = sum(b.nbytes for b in buffers), self._provisional_cap()
        if size > cap:
            # The job checks it, but may forge the message: one over its client's
            # messages made the client drop this node, with all its jobs.
            worker.log_odd(
                logging.WARNING,
                "job %d sent a provisional result of %d bytes, over the %d bytes "
                "its client takes: not sent",
                message.key,
                size,
                cap,
            )
            return
        self._report_provisional(message.key, message.attempt, buffers)

    def _on_done(self, worker: Worker, done: Done, buffers: list[memoryview]) -> None:
        if done.after:
            done, buffers = texts_after(done, buffers)
        self._settle_done(worker, done, buffers)
        if self.result_objects.used:
            # A result in shared memory that did not go on (a job cancelled or
            # dropped meanwhile) is nobody else's to unlink.
            self.result_objects.unless_sent(buffers)

    def _settle_done(
        self, worker: Worker, done: Done, buffers: list[memoryview]
    ) -> None:
        latest = time.time() + CLOCK_SLACK
        if not (0.0 <= done.start_time <= latest and 0.0 <= done.end_time <= latest):
            done = own_times(done, latest - CLOCK_SLACK)  # (NaN fails every test)
        if worker.taken_back and self._skipped_taken_back(worker, done):
            return
        if not worker.assigned or worker.assigned[0].key != done.key:
            worker.log_odd(
                logging.ERROR,
                "worker %d reported an unexpected job %d",
                worker.pid,
                done.key,
            )
            return
        job = worker.assigned.popleft()
        worker.stalled = False
        if done.kept and job.lease is not None:
            BODIES.forget(job.lease)  # the worker's objects still use its memory
        if self.limits.fresh_process:
            worker.retiring = True  # it exits after this job: give it no other
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if worker.assigned:
            self._start_clock(worker)  # the job sent ahead starts now
        self._release_job_files(job)
        duration = max(done.end_time - done.start_time, 0.0)
        if done.outcome != CANCELLED:  # a skipped job says nothing about durations
            mean = self._mean
            self._mean = duration if mean is None else 0.8 * mean + 0.2 * duration
        if (
            (job.moving or job.dropped is not None)
            and done.outcome == CANCELLED
            and not job.cancelled
        ):
            # Skipped as the job before it was stopped: it runs on another worker
            # (unless the client cancelled it meanwhile, if it had not started,
            # or the node dropped the jobs not started: `_drop_waiting`).
            if job.skipping:
                reason = "job cancelled at the client's request before it started"
                self._finish_unrun(job, reason)
            elif job.dropped is not None:
                job.reported = True
                self._report_unrun(job, *job.dropped)
            else:
                self._requeue_or_fail(job)
        elif job.cancelled and done.outcome == CANCELLED:
            # Skipped by the worker (a cancel that came as it became the head, after
            # it was told to skip it): it never ran, so not reported terminated.
            if not job.reported:
                self._finish_unrun(job, "job cancelled at the client's request")
        elif job.cancelled and (done.outcome != FINISHED or job.timed_out):
            if job.start_held and not job.reported:  # it ran: started first
                self._runs_after_all(job, done.start_time)
            self._finish_killed(job)
        elif (
            worker.interrupted
            and worker.page is None
            and not job.cancelled
            and was_interrupted(done)
        ):
            # Without an interrupt page, the SIGINT meant for the job before it
            # (which ended just then) hit this one: run again, unless its start
            # was reported (not under the same attempt).
            if job.start_held:
                self._requeue_or_fail(job)
            else:
                self._report_stopped_by_node(job)
        elif not job.reported:
            if job.start_held:
                self._runs_after_all(job, done.start_time)
            if done.kinds:  # read while it is reported (session, kept results)
                self.result_kinds[job.key] = done.kinds
            # A cancelled job that caught its KeyboardInterrupt and returned ends
            # Finished with its value, as in dispy.
            finished = done.outcome == FINISHED
            exception: Any
            stdout, stderr, exception = done.stdout, done.stderr, done.exception
            if (
                done.utf8
                or type(exception) is bytes
                or len(stdout) > NOTE_BYTES
                or len(stderr) > NOTE_BYTES
                or (exception is not None and len(exception) > NOTE_BYTES)
            ):
                limit = self._max_output()
                why = output_limit(limit, self._max_size)
                stdout, stderr, exception = entry_texts(done, limit, why)
            outcome = done.outcome
            if finished and (refused := self._refused_result(worker, job, buffers)):
                finished, outcome, exception = False, RAISED, refused
            entry = ResultEntry(
                key=job.key,
                attempt=job.attempt,
                outcome=outcome,
                start_time=done.start_time,
                end_time=done.end_time,
                stdout=stdout,
                stderr=stderr,
                exception=exception,
                buffer_count=len(buffers) if finished else 0,
            )
            if finished and self.result_objects.used:
                self.result_objects.sent(buffers)
            self._report(entry.to_wire(), buffers if finished else [])
            if done.kinds:
                self.result_kinds.pop(job.key, None)
        if worker.interrupted and not worker.assigned and not worker.retiring:
            # An interrupted worker may hold broken state (locks, half-done work):
            # replaced, once the jobs it started before it read their Skips (the
            # job interrupted ended just as it was signalled) ran to their end.
            self._retire(worker)
        elif worker.assigned and worker.assigned[0].cancelled:
            # It should skip that job; if it had started it already, interrupt it.
            loop = asyncio.get_running_loop()
            loop.call_later(SKIP_GRACE, self._interrupt_if_head, worker)
        if not worker.assigned:
            self._release_cpu(worker)
        self._pump()
        if not worker.assigned and not self._queue and self._steal_timer is None:
            self._steal_later()
        self._note_progress()

    def _refused_result(
        self, worker: Worker, job: NodeJob, buffers: list[memoryview]
    ) -> str:
        """Why a job's result is not sent ("" if it is): over its cap. The worker
        checks it, but the job may send its own `Done`: its client got a result
        over its max_result_size, or, streamed, "the result arrived incomplete"."""
        size, cap = sum(b.nbytes for b in buffers), self._result_cap()
        if size <= cap:
            return ""
        worker.log_odd(
            logging.WARNING,
            "job %d sent a result of %d bytes, over the %d bytes its client takes: "
            "not sent",
            job.key,
            size,
            cap,
        )
        return (
            f"dispynb.errors.ResultTooLarge: the job's result came as {size} bytes, "
            f"over the limit of {cap} bytes (max_result_size), past the job's own "
            "check: not sent\n"
        )

    def _runs_after_all(self, job: NodeJob, start_time: float) -> None:
        """A head job whose start was held (`_start_clock`: it might be skipped)
        shows it runs: its end, a provisional result or a file it sends. Its worker
        started it before it read the Skip (the job before it ended just as the
        Skip was sent). Its start goes to the client now, before what showed it:
        a client never sees a provisional result of a job not started."""
        job.start_held = False
        job.moving = False  # it runs here: it cannot move any more (a cancel stops it)
        job.start_time = start_time
        if self.on_start is not None:
            self.on_start(job.key, job.attempt, start_time)
