"""Work stealing between a computation's workers on this node: the short jobs sent
ahead to a busy worker are taken back and run on an idle one when the job they wait
behind takes far longer than the others."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

from dispynb.errors import DispynbError
from dispynb.protocol.messages import CANCELLED
from nodeserver.compstate import NodeJob, Worker, _ComputationState
from nodeserver.ipc import Done, Skip
from nodeserver.jobstops import _before_its_turn

logger = logging.getLogger("nodeserver.computation")

#: Seconds after a worker went idle with nothing queued at which the jobs still
#: waiting ahead in a busy worker are taken back and run on the idle ones: the job
#: they wait behind takes far longer than the others (short on average, else none
#: would have gone ahead). Work stealing, checked once per such lull: jobs that are
#: all short never pay a message for it. A busy worker the node cannot be sure of
#: then (its Runs not all written, its answers not read) is looked at again when
#: that changes (`_WorkStealing._look_again`), not every STEAL_AFTER: its job may run
#: for hours, and a held client may not read for as long.
STEAL_AFTER = 0.01


class _WorkStealing(_ComputationState):
    """A `Computation`'s part that moves jobs waiting ahead in a busy worker."""

    def _steal_later(self) -> None:
        """A worker is idle with nothing queued: if another holds jobs ahead, look
        again in `STEAL_AFTER` whether they still wait there."""
        for other in self._workers.values():
            if len(other.assigned) > 1:
                loop = asyncio.get_running_loop()
                self._steal_timer = loop.call_later(STEAL_AFTER, self._steal)
                return

    def _steal(self) -> None:
        """Give the jobs still waiting ahead in busy workers to idle ones."""
        self._steal_timer = None
        if self._queue or self.limits.fresh_process or self._handed_back:
            return
        if not any(
            not w.assigned
            and w.returncode is None
            and not w.stream_closed
            and not w.retiring
            for w in self._workers.values()
        ):
            return
        taken: list[NodeJob] = []
        for worker in self._workers.values():
            if len(worker.assigned) > 1:
                back = self._take_back(worker)
                if back is None:
                    self._look_again(worker)
                else:
                    taken += back
        if taken:
            self._queue.extendleft(reversed(taken))
            self._pump()

    def _steal_soon(self) -> None:
        """`_steal` once the callback running now returns (the messages read with
        the one handled now are handled first)."""
        if self._steal_timer is None:
            self._steal_timer = asyncio.get_running_loop().call_soon(self._steal)

    def _look_again(self, worker: Worker) -> None:
        """Steal again once the node can be sure of ``worker`` (`_take_back` was
        not): once its Runs are all written, or a message from it is read (what it
        sent waited). Not polled: that would wake the node every `STEAL_AFTER` for
        as long as the worker's job runs (its Runs wait for it to read them) or
        its client does not read (its answers wait)."""
        if worker.conn.all_sent:
            worker.look_on_read = True
        elif not worker.drain_watched:
            worker.drain_watched = True
            task = asyncio.get_running_loop().create_task(self._look_once_sent(worker))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _look_once_sent(self, worker: Worker) -> None:
        try:
            await worker.conn.flush()
        except DispynbError:
            return  # the worker is gone: its jobs are settled with it
        finally:
            worker.drain_watched = False
        self._steal_soon()

    def _take_back(self, worker: Worker) -> list[NodeJob] | None:
        """Tell a busy worker to skip the jobs waiting ahead in it; return those it
        is sure to skip (`_before_its_turn`), to run elsewhere now. The others (its
        job ended just as it was told) move off it only if it says it skipped them,
        as those of an interrupted worker do (`NodeJob.moving`). None: what it sent
        waits to be read, so the jobs ahead may have run already, or its Runs are
        not all written; not now (`_look_again`)."""
        if (
            worker.interrupted
            or worker.retiring
            or worker.stream_closed
            or worker.returncode is not None
        ):
            return []
        behind = [
            job
            for job in itertools.islice(worker.assigned, 1, None)
            if not (job.reported or job.cancelled or job.skipping or job.moving)
            and job.dropped is None  # told to skip already: its answer settles it
            and job.lease is None  # its shared body may be mapped there
            and job.buffers
        ]
        if not behind:
            return []
        if not _before_its_turn(worker):
            # Its results wait here (its jobs ahead may be done, or running): once
            # read, the jobs still ahead of it are known. Told to skip jobs it ran,
            # it would only be believed on their ends (their starts held till then).
            return None
        worker.stalled = True
        # The Skips first, then the check again: written before the worker has sent
        # the end of its running job, they are read before it starts another.
        with contextlib.suppress(DispynbError):
            for job in behind:
                worker.conn.write(Skip(key=job.key))
        if not _before_its_turn(worker):
            for job in behind:
                job.moving = True
            return []
        for job in behind:
            worker.assigned.remove(job)
            worker.taken_back.append((job.key, job.attempt))
            self._release_job_files(job)  # placed again when it is sent
        return behind

    def _skipped_taken_back(self, worker: Worker, done: Done) -> bool:
        """Whether ``done`` is the worker's word on a job taken back from it (its
        first after the Skip: the job's next run there, if any, ends after it)."""
        ident = (done.key, done.attempt)
        if ident not in worker.taken_back:
            return False
        worker.taken_back.remove(ident)
        if done.outcome != CANCELLED:
            logger.error(
                "worker %d started job %d it was sure to skip", worker.pid, done.key
            )
        return True
