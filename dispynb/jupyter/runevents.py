"""A `Run` follows its jobs through the cluster's events (on its callback thread)
and draws as they arrive: the thread that waits (`wait`), or the callback thread
itself in live mode."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from dispynb._callbacks import _call_each
from dispynb._interruptible import try_start_thread
from dispynb.job import FINAL_STATUSES, DispyJob, JobStatus
from dispynb.jupyter.errors import RunInterrupted
from dispynb.jupyter.progress import ProgressBar
from dispynb.jupyter.runoutput import _print_writer
from dispynb.jupyter.runstate import _FAILED, _TICK, Writer
from dispynb.jupyter.runstop import _RunStop

if TYPE_CHECKING:
    from dispynb.node import DispyNode


#: The statuses whose ``cluster_status`` event names the node a job runs (ran) on.
_RAN_ON = frozenset((JobStatus.Running, *FINAL_STATUSES))


def requeued(status: int, job: DispyJob) -> bool:
    """Whether ``cluster_status(status, node, job)`` says that ``job`` was moved off
    a lost node to run elsewhere (reentrant): as dispy says it, ``Abandoned`` with
    the job's copy back to ``Created``."""
    return status == JobStatus.Abandoned and job.status == JobStatus.Created


class _RunEvents(_RunStop):
    """The cluster's events, live mode and waiting."""

    # -- events (on the cluster's callback thread) -----------------------------------

    def _on_job_status(self, job: DispyJob) -> None:
        if self._user_job_status is not None:
            self._user_job_status(job)

    def _on_cluster_status(
        self, status: int, node: DispyNode | None, job: DispyJob | None
    ) -> None:
        try:
            if job is not None and requeued(status, job):
                self._job_requeued(job)
            elif job is not None:
                if node is not None and status in _RAN_ON:
                    self._ran_on[job.id] = node
                self._job_event(status, job)
            for listener in list(self._listeners):
                listener(status, node, job)
        finally:
            if self._user_cluster_status is not None:
                self._user_cluster_status(status, node, job)

    def _job_event(self, status: int, job: DispyJob) -> None:
        key = job.id
        with self._lock:
            known = key in self._index
            if status == JobStatus.Running:
                if not known:
                    self._early_running.add(key)
                elif key not in self._ended:
                    self._running.add(key)
            elif status in FINAL_STATUSES:
                self._job_final(key, JobStatus(status))
            elif status == JobStatus.ProvisionalResult:
                if key in self._ended:
                    return
                self._provisional[key] = job.result
                self._provisional_count += 1
                self._latest = (key, job.result)
                if known:
                    self._running.add(key)
                else:
                    self._early_running.add(key)
            else:
                return
        self._notify()

    def _jobs_cancelled(self, jobs: list[DispyJob]) -> None:
        """Jobs the cluster cancelled together before they ran (a Stop's 200,000
        queued), as their ``Cancelled`` events one by one, but counted under one
        lock and drawn once. The cluster posts this only to a run that passes no
        job on (`forwards_events`): no callback of the user's to call."""
        cancelled = JobStatus.Cancelled
        try:
            with self._lock:
                for job in jobs:
                    self._job_final(job.id, cancelled)
            listeners = list(self._listeners)
            if listeners:
                _call_each(self._tell, ((listeners, job) for job in jobs))
        finally:
            self._notify()

    @staticmethod
    def _tell(listeners: list[Any], job: DispyJob) -> None:
        for listener in listeners:
            listener(JobStatus.Cancelled, None, job)

    def _job_final(self, key: Any, status: JobStatus) -> None:
        """A job's final status, under the lock: counted, or kept until the run
        knows the job (an event may come before `Run.map` indexed it)."""
        if key not in self._index:
            self._early_final[key] = status
        else:
            self._end_job(key, status)

    def _job_requeued(self, job: DispyJob) -> None:
        """``job``'s node was lost and it waits to run elsewhere (reentrant)."""
        with self._lock:
            if job.id in self._ended:
                return
            self._running.discard(job.id)
            self._early_running.discard(job.id)
        self._notify()

    def _end_job(self, key: Any, status: JobStatus) -> None:
        """Count a job's final status; called with the lock held."""
        if key in self._ended:
            return
        self._ended[key] = status
        self._running.discard(key)
        job = self.jobs[self._index[key]]
        if status is JobStatus.Terminated and self._cancelled_elsewhere(job):
            self._cancelled.add(key)  # by cluster.cancel(job), the web monitor...
        stopped = status is JobStatus.Terminated and key in self._cancelled
        if status is JobStatus.Finished:
            self._tally["finished"] += 1
        elif status is JobStatus.Cancelled or stopped:
            self._tally["cancelled"] += 1
        else:
            self._tally["failed"] += 1
        if job.stdout or job.stderr or (status in _FAILED and not stopped):
            self._outputs.append(job)
        if len(self._ended) >= len(self.jobs):
            self._stop = time.monotonic()

    def _cancelled_elsewhere(self, job: DispyJob) -> bool:
        """Whether ``job`` was cancelled through the run's cluster, not the run
        (``cluster.cancel(job)``, the web monitor's Cancel)."""
        asked = getattr(self.cluster, "_cancel_requested", None)
        return asked is not None and bool(asked(job))

    def _notify(self) -> None:
        self._changed.set()
        if self._waiting:
            return
        if self._live:  # nobody waiting: this (callback) thread draws
            self._pump(self._log_writer())
        if not (self._live or self._unattended) or not self.done():
            return
        if self._live:
            self.bar.finish(self.counts())
        if self.owns_cluster and not self._closed:
            # Not on this thread: closing waits for the cluster's callbacks. Where
            # no thread can start (at exit), the exit functions close it.
            try_start_thread(
                threading.Thread(
                    target=self.close, name="dispynb-run-close", daemon=True
                )
            )

    def unattended(self) -> None:
        """Nobody may wait for this run (``Run.map(wait=False)``): it closes the
        cluster it owns once its jobs have ended, as `wait` would, so that no
        cluster stays open (its panel card offering a Cancel) with nothing to do.
        `wait` (and `live`) still work afterwards."""
        self._unattended = True
        self._notify()

    # -- live mode (notebook, --nowait) ------------------------------------------------

    def live(self, bar: ProgressBar, log: Writer | None = None) -> None:
        """Let the callback thread draw ``bar`` and write output to ``log`` as events
        arrive, for runs nobody waits for. ``log(stream, text)`` gets ``"stdout"`` or
        ``"stderr"`` and the text."""
        self.bar = bar
        self._log = log
        self._live = True
        self._notify()

    def _log_writer(self) -> Writer | None:
        return self._log

    # -- waiting ---------------------------------------------------------------------

    def wait(self, timeout: float | None = None, *, echo: bool = True) -> bool:
        """Block until every job has ended, drawing progress and printing output.

        Each job's remote stdout and stderr are printed (to ``sys.stdout`` and
        ``sys.stderr``, or to the run's output widget in `live` mode) as the job
        ends, and the traceback of the first failure of each kind. A run that owns
        its cluster closes it at the end.

        Parameters
        ----------
        timeout:
            Seconds to wait at most; ``None`` waits until done.
        echo:
            Print remote output and tracebacks (they stay in `df` either way).

        Returns
        -------
        bool
            True if every job has ended, False if ``timeout`` passed first.

        Raises
        ------
        RunInterrupted
            A `KeyboardInterrupt`, after cancelling the run's unfinished jobs on the
            nodes (see `cancel`); its ``run`` is this run.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # Output goes where the run sends it: its output widget when live, else here.
        writer = (self._log or _print_writer) if echo else None
        self._waiting = True
        # Stop at any point until the cluster is closed (as the bar shows, as the
        # last output is written, as the cluster closes) stops the run: nothing is
        # left running, open or unsaid.
        try:
            if not self._live:
                self.bar.show()
            while True:
                self._changed.clear()
                finished = self.done()
                self._pump(writer)
                if finished:
                    break
                tick = _TICK
                if deadline is not None:
                    tick = min(tick, deadline - time.monotonic())
                    if tick <= 0:
                        return False
                self._changed.wait(tick)
            self.bar.finish(self.counts())
            if writer is not None:
                self._summary(writer)
            if self.owns_cluster:
                self.close()
        except KeyboardInterrupt:
            self._waiting = False
            summary = self.stop("Interrupted", echo=echo, quiet=True)
            raise RunInterrupted(summary, run=self) from None
        finally:
            self._waiting = False
        return True

    __call__ = wait
