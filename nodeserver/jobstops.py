"""Stopping a computation's jobs on this node: cancels (of queued, running or sent-
ahead jobs), jobs handed back or dropped before they start, time limits, and the
interrupts and kills that end a running job."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import sys
import termios
import time

from dispynb.errors import DispynbError
from dispynb.protocol.messages import CANCELLED, RETURNED, TERMINATED
from nodeserver.compstate import NodeJob, Worker, _ComputationState
from nodeserver.ipc import InterruptPage, Skip
from nodeserver.jobreasons import TERMINATED_AT_REQUEST, timeout_reason

logger = logging.getLogger("nodeserver.computation")

#: Seconds a cancelled job gets to end after its KeyboardInterrupt before it is
#: killed (one that ignores or blocks SIGINT gets none: it is killed at once).
CANCEL_GRACE = 3.0

#: Seconds a job over its time limit gets to end after its KeyboardInterrupt before
#: its worker is killed (shorter than a cancel's: it already had its time).
TIMEOUT_GRACE = 2.0


#: Why a job sent ahead, cancelled unless started, did not run.
_SKIPPED = "job cancelled at the client's request before it started"


def give_interrupt_page(worker: Worker) -> None:
    """Send a new worker its interrupt page (`nodeserver.ipc.InterruptPage`), first
    on its channel: the node names there the job each SIGINT is for. Without one
    (no memfd here), a SIGINT interrupts whatever job the worker runs."""
    try:
        fd = os.memfd_create("dispynb-interrupt", os.MFD_CLOEXEC)
    except (AttributeError, OSError) as exc:
        logger.debug("no interrupt page for worker %d: %s", worker.pid, exc)
        return
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        page = mmap.mmap(fd, 8)
    except OSError as exc:
        logger.debug("no interrupt page for worker %d: %s", worker.pid, exc)
        os.close(fd)
        return
    # Held until the worker is lost: it must stay open until the message is sent.
    worker.page_fd, worker.page = fd, memoryview(page).cast("q")
    with contextlib.suppress(DispynbError):  # a worker gone: lost with it
        worker.conn.write(InterruptPage(), (), (fd,))


def drop_interrupt_page(worker: Worker) -> None:
    """The worker is lost: close its interrupt page's memfd and mapping now. The
    mapping holds a descriptor of its own (`mmap` duplicates the memfd's), which
    went only when a garbage collection found the lost worker: dozens per closed
    computation meanwhile, counted against the node's descriptor limit when it
    admits computations (`nodeserver.descriptors`)."""
    if worker.page_fd is not None:
        os.close(worker.page_fd)
        worker.page_fd = None
    page, worker.page = worker.page, None
    if page is not None:
        mapping = page.obj
        page.release()
        if isinstance(mapping, mmap.mmap):
            mapping.close()


def _before_its_turn(worker: Worker) -> bool:
    """Whether the worker is sure to read what was written to it before it starts
    its second job: everything written is in its socket, and nothing it sent waits
    to be read here or in the kernel. It starts that job only after it sent the
    `Done` of the first (a worker reads what it was sent before each job sent
    ahead); not seen yet, that `Done` was not sent yet."""
    conn = worker.conn
    if worker.returncode is not None or worker.stream_closed or not conn.all_sent:
        return False
    return _nothing_unread(worker)


def _nothing_unread(worker: Worker) -> bool:
    """Whether nothing the worker sent waits to be read, here or in the kernel."""
    if worker.conn.holds_received:
        return False
    waiting = bytearray(4)
    try:
        fcntl.ioctl(worker.sock.fileno(), termios.FIONREAD, waiting)
    except OSError:
        return False
    return int.from_bytes(waiting, sys.byteorder) == 0


class _JobStops(_ComputationState):
    """Cancels, time limits, interrupts, and the reports of jobs stopped."""

    def cancel(self, key: int, attempt: int, unstarted: bool = False) -> None:
        """Terminate a job: drop it if queued, kill its worker if it is running
        (with ``unstarted``, a running job goes on)."""
        for job in self._queue:
            if job.key == key and job.attempt == attempt:
                self._queue.remove(job)
                self._finish_unrun(job, "job cancelled at the client's request")
                return
        for worker in self._workers.values():
            for position, job in enumerate(worker.assigned):
                if job.key == key and job.attempt == attempt:
                    # A job moving away from a worker (told to skip it) may have
                    # started once it is that worker's head: the worker read the
                    # Skip too late. Only its answer tells (`_on_done`).
                    started = position == 0 and not job.moving
                    if job.cancelled or (started and unstarted):
                        # Stopping already (cancelled, or over its timeout); or
                        # running, and only a job not started was to be dropped.
                        return
                    if unstarted:
                        # Sent ahead: only the worker knows whether it has begun
                        # it. Its answer is the outcome: cancelled if it skipped
                        # the job, else the job's own (it runs to its end).
                        if not job.skipping:
                            job.skipping = True
                            with contextlib.suppress(DispynbError):
                                worker.conn.write(Skip(key=key))
                        if position > 0 and _before_its_turn(worker):
                            # Sure to be skipped: settled now, not once the jobs
                            # before it end (Future.cancel() waits for this).
                            job.cancelled = True
                            self._finish_unrun(job, _SKIPPED)
                        return
                    job.cancelled = True
                    if position == 0:
                        # Running, or perhaps (moving): interrupted. Skipped after
                        # all, it ends cancelled; it ran, terminated.
                        self._interrupt(worker, job)
                    else:
                        # Sent ahead, not started: settle it now, and tell the worker
                        # to skip it (checked before it starts each job).
                        self._finish_unrun(job, "job cancelled at the client's request")
                        with contextlib.suppress(DispynbError):
                            worker.conn.write(Skip(key=key))
                    return

    def terminate_all(self) -> None:
        """Terminate every job: drop the queued ones, kill the running ones (a
        recovering client's ``recover_jobs(terminate_pending=True)``)."""
        jobs = [(job.key, job.attempt) for job in self._queue]
        for worker in self._workers.values():
            jobs += [(job.key, job.attempt) for job in worker.assigned]
        for key, attempt in jobs:
            self.cancel(key, attempt)

    def hand_back(self) -> None:
        """The node shuts down: give back every job that has not started.

        Queued jobs and jobs sent ahead to a busy worker (which is told to skip them)
        are reported ``returned``, so the client runs them elsewhere; no new job is
        accepted after this.
        """
        self._handed_back = True
        self._drop_waiting(RETURNED, "the node is shutting down; the job did not start")

    def cancel_waiting(self) -> None:
        """Cancel every job that has not started (``close_node``): queued ones and
        those sent ahead to a busy worker; running jobs go on."""
        self._drop_waiting(
            CANCELLED, "cancelled: the node was closed for the computation (close_node)"
        )

    def terminate_running(self) -> None:
        """Mark the running jobs terminated at the client's request (``close_node``
        with ``terminate_pending``): as `close` kills their workers, each is
        reported ``Terminated``, as dispy's node reports them, not lost with the
        computation."""
        for head in self._running_heads():
            head.cancelled = True

    def terminate_running_now(self) -> None:
        """Cancel the running jobs of a computation being closed (a second
        ``close_node``, with ``terminate_pending``): they end ``Terminated`` as
        cancelled ones do (`cancel`), and the close goes on once they ended."""
        for head in self._running_heads():
            self.cancel(head.key, head.attempt)

    def _running_heads(self) -> list[NodeJob]:
        """The job each worker runs that nothing else ends already (reported,
        cancelled, dropped or moving); a list, as `cancel` changes the workers."""
        heads = (
            worker.assigned[0] for worker in self._workers.values() if worker.assigned
        )
        return [
            head
            for head in heads
            if not (head.reported or head.cancelled or head.dropped or head.moving)
        ]

    def _drop_waiting(self, outcome: str, reason: str) -> None:
        """Report every job that has not started as ``outcome`` (never run).

        A job sent ahead is told to skip; it is reported now only if its worker
        is sure to read that before it starts it (`_before_its_turn`). Else, as
        for a head job moving away (the worker may have read its Skip too late),
        the worker's answer says: skipped, it is reported ``outcome`` then
        (`NodeJob.dropped`); started, it runs to its end, reported as it ends.
        """
        dropped = list(self._queue)
        self._queue.clear()
        for worker in self._workers.values():
            waiting = [
                job
                for position, job in enumerate(worker.assigned)
                if (position > 0 or job.moving)
                and not (job.reported or job.cancelled or job.dropped)
            ]
            if not waiting:
                continue
            with contextlib.suppress(DispynbError):
                for job in waiting:
                    worker.conn.write(Skip(key=job.key))
            # Checked once the Skips are written: the worker reads them first.
            sure = _before_its_turn(worker)
            for job in waiting:
                if sure and job is not worker.assigned[0]:
                    job.cancelled = True
                    dropped.append(job)
                else:
                    job.dropped = (outcome, reason)
        for job in dropped:
            job.reported = True
            self._report_unrun(job, outcome, reason)

    def _interrupt(
        self, worker: Worker, job: NodeJob, grace: float | None = None
    ) -> None:
        """Cancel a running job as dispy does: KeyboardInterrupt, then kill after
        ``grace`` seconds (default `CANCEL_GRACE`), or at once if the job ignores
        or blocks SIGINT: waiting would only keep a Stop waiting for nothing.

        The jobs sent ahead to the worker move first: it is told to skip them
        (before the signal, so that it reads this before it would start the next
        one), and they run on another worker (`Computation._on_done`). Else the
        next one would start as the interrupted job ends, on a worker about to be
        replaced: killed with it (and run again), or taken for a running job by a
        cancel that follows (terminated, not cancelled)."""
        for behind in list(worker.assigned)[1:]:
            if not (behind.reported or behind.cancelled or behind.moving):
                behind.moving = True
                if not behind.skipping:  # else told already
                    with contextlib.suppress(DispynbError):
                        worker.conn.write(Skip(key=behind.key))
        worker.interrupted = True
        if worker.page is not None:
            # Named first: if the job ends as the signal is sent, the worker's
            # next job (started before it read the Skip) ignores the SIGINT. And
            # once the page names it, the worker starts no job sent ahead: a kill
            # (at once, or at the grace's end) that comes as the job ends finds
            # the worker idle, never running a job of the jobs behind it, whose
            # Skips may wait here behind their Runs (its socket full).
            worker.page[0] = job.run
        # Deaf, it is killed at once only if its job is surely ``job``: the worker
        # sends a job's `Done` before it starts the next, so if the next one made
        # it deaf, that Done waits unread. Else the grace's end decides, once read.
        # Without a page, only if the Skips are in its socket (read before it
        # would start another job).
        if (
            not self._launcher.interrupt(worker.process)
            and _nothing_unread(worker)
            and (worker.page is not None or worker.conn.all_sent)
        ):
            self._escalate(worker, job)
            return
        loop = asyncio.get_running_loop()
        loop.call_later(
            CANCEL_GRACE if grace is None else grace, self._escalate, worker, job
        )

    def _start_clock(self, worker: Worker) -> None:
        """The worker's head job starts now: tell the client (``on_start``), and arm
        its time limit, if it has one."""
        job = worker.assigned[0]
        # A job the worker may skip is not reported started: its end says.
        unsure = job.cancelled or job.skipping or job.moving or job.dropped is not None
        job.start_held = unsure
        if not unsure:
            job.start_time = time.time()
            if self.on_start is not None:
                self.on_start(job.key, job.attempt, job.start_time)
        if job.timeout is not None and job.timer is None and not job.cancelled:
            loop = asyncio.get_running_loop()
            job.timer = loop.call_later(job.timeout, self._time_out, worker, job)

    def _time_out(self, worker: Worker, job: NodeJob) -> None:
        """A job ran over its time limit: stop it as a cancel does, with less grace."""
        job.timer = None
        if job.reported or job.cancelled or not worker.assigned:
            return
        if worker.assigned[0] is not job or worker.returncode is not None:
            return
        logger.info(
            "job %d of %s ran over its time limit of %g s; stopping it",
            job.key,
            self.name,
            job.timeout,
        )
        job.timed_out = job.cancelled = True
        self._interrupt(worker, job, TIMEOUT_GRACE)

    def _interrupt_if_head(self, worker: Worker) -> None:
        if worker.assigned and worker.assigned[0].cancelled and not worker.interrupted:
            self._interrupt(worker, worker.assigned[0])

    def _escalate(self, worker: Worker, job: NodeJob) -> None:
        if worker.assigned and worker.assigned[0] is job and not worker.retiring:
            self._retire(worker)

    def _retire(self, worker: Worker) -> None:
        """Kill a worker and its job's processes (its group) on purpose; the
        computation process starts a new one."""
        worker.retiring = True
        self._launcher.kill_group(worker.process)

    def _finish_unrun(self, job: NodeJob, reason: str) -> None:
        """Report a job that never started."""
        job.reported = True
        self._report_unrun(job, CANCELLED, reason)

    def _finish_killed(self, job: NodeJob) -> None:
        """Report a cancelled job once its worker stopped (unless settled already)."""
        if job.reported:
            return
        job.reported = True
        # The client tells this reason from a failure's (`dispynb.job._failed`).
        reason = TERMINATED_AT_REQUEST
        if job.timed_out and job.timeout is not None:
            reason = timeout_reason(job.timeout)
        self._report_unrun(job, TERMINATED, reason)
