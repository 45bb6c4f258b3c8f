"""The Ray engine's jobs whose actor died under them: the calls of a lost actor are
settled (`_Deaths._fail_inflight`); its running job, once the inbox is read once
more, ends as its death says (`_Deaths._settle_dying`): Terminated if it ended its
process itself, else run again (reentrant, up to ``max_attempts``) or Abandoned."""

from __future__ import annotations

from dispynb.backends._raystate import _RayState, _Slot, _terminated
from dispynb.backends.base import JobRequest
from dispynb.jobenv import TERMINATED_AT_REQUEST, timeout_reason
from dispynb.scheduler.state import attempts_spent


class _Deaths(_RayState):
    """Settle the jobs of actors that died (killed by us, crashed, node lost)."""

    def _fail_inflight(self, slot: _Slot, reason: str) -> None:
        killed_for, slot.killed_for = slot.killed_for, None
        self._cancel_timer(slot)
        calls = list(slot.inflight)
        slot.inflight.clear()
        requeue: list[JobRequest] = []
        dying: list[int] = []
        running = calls[0][2] if calls else None
        for key, _, ref in calls:
            # "running": the actor's running call (a batch's jobs may all have run).
            index = 0 if ref is running else 1
            self._where.pop(key, None)
            job = self._jobs.get(key)
            if job is None:
                continue
            # (asked, not answered yet or ever)
            skip = self._skipping.pop(key, None) or self._unanswered.pop(key, None)
            if skip == "cancel":
                self._cancelling.add(key)
            if index == 0 and (key == killed_for or key in self._cancelling):
                timed_out = key in self._timed_out_keys
                self._forget(key)
                why = (
                    timeout_reason(job.timeout)
                    if timed_out and job.timeout is not None
                    else TERMINATED_AT_REQUEST
                )
                self._events.job_done(
                    key,
                    slot.node.info,
                    _terminated(
                        f"{why} (its Ray actor was killed: Ray restarts it, and "
                        "setup runs again)\n"
                    ),
                )
            elif index and (key in self._cancelling or skip == "unstarted"):
                self._forget(key)
                self._events.job_cancelled(key)
            elif index == 0:  # did it end its process? the inbox may say
                self._dying[key] = (slot.node, reason)
                dying.append(key)
            else:
                requeue.append(job)
        for job in reversed(requeue):
            self._enqueue(job, first=True)
        if dying:
            self._read_for_dying(dying)

    def _settle_dying(self, keys: list[int]) -> None:
        """Jobs whose actor died under them (`_fail_inflight`), the inbox read since:
        one that called ``os._exit`` ends Terminated saying so, as on dispynb's
        nodes (not run again: it would end its process again); the others, whose
        worker or node died, run again if the cluster is reentrant (at most
        ``max_attempts`` in all), else end Abandoned."""
        requeue: list[JobRequest] = []
        for key in keys:
            dying = self._dying.pop(key, None)
            job = self._jobs.get(key)
            if dying is None or job is None:
                continue  # settled meanwhile (the cluster closed)
            node, reason = dying
            status = self._exited.get(key)
            if status is not None:
                self._forget(key)
                self._events.job_done(key, node.info, _terminated(_exit_text(status)))
            elif not self._reentrant:
                self._forget(key)
                self._events.job_abandoned(
                    key,
                    self._view(node),
                    f"its Ray worker died while it ran ({reason}); the cluster is "
                    "not reentrant, so the job is not run again",
                )
            else:
                lost = self._lost_on.setdefault(key, [])
                lost.append(node.host)
                if len(lost) >= self._max_attempts:  # it may kill every worker
                    self._forget(key)
                    last = f"its Ray worker died while it ran ({reason})"
                    self._events.job_abandoned(
                        key, self._view(node), attempts_spent(tuple(lost), last)
                    )
                    continue
                self._events.job_requeued(key)
                requeue.append(job)
        for job in reversed(requeue):
            self._enqueue(job, first=True)


def _exit_text(status: int) -> str:
    """Why a job that called ``os._exit(status)`` ended (in the words of dispynb's
    nodes for a worker process that exited)."""
    return (
        f"the job's worker process exited with status {status} (the job called "
        "os._exit(); Ray restarts its actor, and setup runs again)\n"
    )
