"""Cancelling a `Run`'s jobs, stopping it (what an interrupted wait does) and
closing its cluster."""

from __future__ import annotations

import collections
import time
import weakref
from typing import Any

from dispynb._interruptible import HeldInterrupts
from dispynb.job import DispyJob, JobStatus
from dispynb.jupyter.runoutput import _print_writer, _RunOutput
from dispynb.jupyter.runstate import _TICK

#: Seconds an interrupted run waits for the nodes to confirm its cancellations.
CANCEL_WAIT = 10.0


#: The run submitting to each cluster, by ``id(cluster)``: a Cancel from elsewhere (the
#: lab panel's) tells the run, so that its running jobs count as cancelled, not failed.
_RUNS: weakref.WeakValueDictionary[int, _RunStop] = weakref.WeakValueDictionary()


def run_of(cluster: Any) -> _RunStop | None:
    """The run whose jobs go to ``cluster`` (None if no run follows it)."""
    run = _RUNS.get(id(cluster))
    return run if run is not None and run.cluster is cluster else None


def starting_run(cluster: Any) -> _RunStop | None:
    """The run a starting ``cluster`` is made for (None if none): `Run.map` attaches
    it once the cluster's constructor returns, after its nodes ran ``setup``, but
    the cluster's ``cluster_status`` callback is the run's from the start."""
    owner = getattr(getattr(cluster, "cluster_status", None), "__self__", None)
    return owner if isinstance(owner, _RunStop) else None


class _RunStop(_RunOutput):
    """Cancelling, stopping and closing."""

    def _follow(self, cluster: Any) -> None:
        """Submit to ``cluster`` (see `run_of`)."""
        self.cluster = cluster
        if cluster is not None:
            _RUNS[id(cluster)] = self

    def cancel(self) -> int:
        """Cancel every unfinished job on the nodes; return how many were cancelled.

        Queued jobs end ``Cancelled``, running ones ``Terminated`` (their worker
        process is killed and replaced).
        """
        cluster = self.cluster
        if cluster is None:
            return 0
        return len(cluster._cancel_all(self.cancelling()))

    def cancelling(self) -> list[DispyJob]:
        """The unfinished jobs, which are being cancelled: when they end (running
        ones ``Terminated``) they count as cancelled, not as failures."""
        unfinished = [job for job in list(self.jobs) if not job.done()]
        with self._lock:
            self._cancelled.update(job.id for job in unfinished)
        return unfinished

    def stopped(self) -> int:
        """How many of its jobs ended ``Terminated`` because the run cancelled them
        (`cancelling`): failures in the cluster's counts, cancelled in the run's."""
        with self._lock:
            return sum(
                self.jobs[self._index[key]].status is JobStatus.Terminated
                for key in self._cancelled
                if key in self._index
            )

    def stop(
        self, reason: str = "Stopped", echo: bool = True, quiet: bool = False
    ) -> str:
        """Cancel the unfinished jobs, wait (at most `CANCEL_WAIT` seconds) for the
        nodes to confirm (and as long again for the run to count what they did),
        close the cluster if owned, and return (and print, unless ``quiet``) a
        one-line account in the progress line's words: how many jobs
        were cancelled (how many of them while running).

        What an interrupted `wait` does before raising `RunInterrupted` (a
        `KeyboardInterrupt`) with that line; a second interrupt stops waiting for the
        confirmations, and closes the run's cluster at once (its nodes end the
        jobs still running with the computation). Cancelled jobs are not
        failures: they count as cancelled.
        """
        self._interrupted = True
        writer = _print_writer if echo else None
        mine: list[DispyJob] = []
        cancelled = False
        try:
            # Stop pressed twice: the second press must not cut the cancellation
            # short (the jobs would run on), only the wait for its confirmation.
            with HeldInterrupts():
                mine = [job for job in list(self.jobs) if not job.done()]
                self.cancel()
                cancelled = True
            deadline = time.monotonic() + CANCEL_WAIT
            while time.monotonic() < deadline:
                self._changed.clear()
                if self.done():
                    break
                self._changed.wait(_TICK)
            self._count_confirmed(mine)
            self._pump(writer)
            self.bar.finish(self.counts())
            if self.owns_cluster:
                self.close(terminate=True)
        except KeyboardInterrupt:
            if not cancelled:  # raised as the step began: nothing sent yet
                mine = [job for job in list(self.jobs) if not job.done()]
                self.cancel()
            if self.owns_cluster:
                # Pressed again: no more waiting for the jobs (one that caught its
                # KeyboardInterrupt and carries on), here or in the close.
                self.close(terminate=True, at_once=True)
            self.bar.finish(self.counts())
        summary = self._stop_summary(reason, mine)
        if not quiet:
            self.bar.before_output()
            _print_writer("stderr", summary + "\n")
        return summary

    def _count_confirmed(self, stopped: list[DispyJob]) -> None:
        """The nodes confirmed the end of every ``stopped`` job, but the run has
        not counted them all yet (its callbacks lag: a 200,000-job Stop on a
        loaded machine): wait for that count too, at most `CANCEL_WAIT` more, so
        that the bar does not end saying '45208 queued, ETA 15:23:50'."""
        if self.done() or not all(job.done() for job in stopped):
            return
        callbacks = getattr(self.cluster, "_callbacks", None)
        if callbacks is not None and not callbacks.in_dispatcher_thread():
            callbacks.flush(CANCEL_WAIT)

    def _stop_summary(self, reason: str, stopped: list[DispyJob]) -> str:
        """The Stop line, in its progress line's words: the jobs the Stop ended are
        cancelled, whether they were running (``Terminated``) or queued."""
        with self._lock:  # a job that raised before the Stop cancelled it failed
            ends = collections.Counter(
                "running"
                if job.status is JobStatus.Terminated and job.id in self._cancelled
                else job.status
                for job in stopped
            )
        after = self.counts()
        running = ends["running"]
        cancelled = ends[JobStatus.Cancelled] + running
        parts = [f"{cancelled} cancelled"]
        if running:
            parts.append(f"{running} of them while running")
        finished = ends[JobStatus.Finished]
        if finished:
            parts.append(f"{finished} finished meanwhile")
        failed = ends[JobStatus.Terminated] + ends[JobStatus.Abandoned]
        if failed:
            parts.append(f"{failed} failed meanwhile")
        unconfirmed = sum(not job.done() for job in stopped)
        if unconfirmed:
            parts.append(f"{unconfirmed} not confirmed by the nodes")
        return (
            f"{reason}: run {self.name!r} stopped, {', '.join(parts)} "
            f"({after.finished} of {after.total} jobs done)"
        )

    def close(self, terminate: bool = False, at_once: bool = False) -> None:
        """Close the run's cluster if the run owns it; ``terminate`` cancels the
        unfinished jobs first (otherwise this waits for them), ``at_once`` too
        waits for none of them to end: the nodes end them with the computation
        (a Stop pressed twice). Idempotent."""
        with self._close_lock:
            if self._closed or self.cluster is None or not self.owns_cluster:
                return
            try:
                terminate_now = getattr(self.cluster, "_terminate", None)
                if terminate and at_once and terminate_now is not None:
                    terminate_now(0)
                else:
                    self.cluster.close(terminate=terminate)
            except KeyboardInterrupt:
                raise  # not closed: Stop's close(terminate=True) closes it
            except BaseException:
                self._closed = True
                raise
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed
