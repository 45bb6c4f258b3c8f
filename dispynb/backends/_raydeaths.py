"""The Ray engine's jobs whose actor died under them: the calls of a lost actor are
settled (`_Deaths._fail_inflight`); its running job ends as its death says
(`_Deaths._settle_dying`), as on dispynb's nodes: Terminated if its process ended
(``os._exit``, a fatal signal, SIGKILL) while its Ray node lives, which the actor's
next life tells (`_rayworker.earlier_lives`: Ray restarts the actor there); else, its
node lost, run again (reentrant, up to ``max_attempts``) or Abandoned."""

from __future__ import annotations

import time
from typing import Any

from dispynb.backends._raystate import _RayState, _Slot, _terminated
from dispynb.backends.base import JobRequest, Outcome
from dispynb.job import JobStatus
from dispynb.jobenv import (
    TERMINATED_AT_REQUEST,
    crash_reason,
    mem_limit_note,
    timeout_reason,
)
from dispynb.scheduler.state import attempts_spent

#: Seconds a job whose actor died waits for the actor's next life to say how its
#: process ended (Ray restarts it on the same node); none by then: its node is lost.
LIFE_WAIT = 30.0

#: Reports of earlier lives kept for a death not seen yet (its call failing).
KEPT_LIVES = 256


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
                dying.append(key)
            else:
                requeue.append(job)
        for job in reversed(requeue):
            self._enqueue(job, first=True)
        for key in dying:  # (several: a batch's jobs, which of them ended it unknown)
            self._dying[key] = (slot, slot.pid, reason, len(dying) > 1)
        if dying:
            self._read_for_dying(dying)

    def _settle_dying(self, keys: list[int], final: bool = False) -> None:
        """Jobs whose actor died under them (`_fail_inflight`), the inbox read since.
        One that called ``os._exit``, or whose process the actor's next life says
        ended (a signal), ends Terminated saying so, as on dispynb's nodes (not run
        again: it would end its process again). Until that life says (`LIFE_WAIT`,
        unless ``final``) a job waits; then its node is taken as lost: it runs
        again if the cluster is reentrant (at most ``max_attempts`` in all), else
        ends Abandoned. A batch's jobs (which of them ended the process is not
        known) are all taken as lost, the reason told."""
        requeue: list[JobRequest] = []
        for key in keys:
            dying = self._dying.get(key)
            job = self._jobs.get(key)
            if dying is None or job is None:
                self._dying.pop(key, None)
                continue  # settled meanwhile (the cluster closed)
            slot, pid, reason, batch = dying
            node = slot.node
            status = self._exited.get(key)
            life = None
            if status is None:
                life = self._lives.get((node.ray_id, pid))
                if life is None and not final and not slot.dead:
                    if key not in self._awaiting_life:
                        self._awaiting_life.add(key)
                        self._runner.loop.call_later(LIFE_WAIT, self._life_late, key)
                    continue
            self._dying.pop(key)
            self._awaiting_life.discard(key)
            if status is not None:
                self._forget(key)
                why = _exit_text(status, job.mem_limit)
                self._events.job_done(key, node.info, _terminated(why))
                continue
            if life is not None and not batch:
                self._forget(key)
                self._events.job_done(key, node.info, _crashed(*life, job.mem_limit))
                continue
            if life is not None:
                reason = "a job of its batch: " + _crash_text(life[0], None).rstrip()
            if not self._reentrant:
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

    def _life_late(self, key: int) -> None:
        """`LIFE_WAIT` passed: job ``key``'s actor said nothing of its death."""
        if key in self._awaiting_life and not self._closed:
            self._settle_dying([key], final=True)
            self._schedule()

    def _life_reported(self, value: Any) -> None:
        """An actor's next life says how an earlier one ended (inbox message
        ``(node id, pid, signal number or 0, faulthandler's report)``): settle the
        job that was running in it."""
        node_id, pid, signum, dump = value
        self._lives[(str(node_id), int(pid))] = (int(signum), str(dump))
        while len(self._lives) > KEPT_LIVES:
            del self._lives[next(iter(self._lives))]
        keys = [
            key
            for key, (slot, dead_pid, _, _) in self._dying.items()
            if dead_pid == pid and slot.node.ray_id == node_id
        ]
        if keys:
            self._settle_dying(keys)
            self._schedule()

    def _settle_lost_slot(self, slot: _Slot) -> None:
        """``slot``'s actor cannot come back: its jobs waiting for its next life's
        word are settled as those of a lost node."""
        keys = [key for key, dying in self._dying.items() if dying[0] is slot]
        if keys:
            self._settle_dying(keys, final=True)


def _exit_text(status: int, mem_limit: int | None) -> str:
    """Why a job that called ``os._exit(status)`` ended (in the words of dispynb's
    nodes for a worker process that exited; ``mem_limit``: the job's)."""
    return (
        f"the job's worker process exited with status {status} (the job called "
        f"os._exit(){mem_limit_note(mem_limit)}; Ray restarts its actor, and setup "
        "runs again)\n"
    )


def _crash_text(signum: int, mem_limit: int | None) -> str:
    """Why a job whose process was killed by ``signum`` ended (dispynb's nodes'
    words); 0: the process recorded no fatal signal (SIGKILL, most likely)."""
    note = mem_limit_note(mem_limit)
    if signum:
        return (
            f"{crash_reason(-signum)}{note} (Ray restarts its actor, and setup runs "
            "again)\n"
        )
    return (
        f"{crash_reason(-9)}, or by another signal it does not catch{note} (the "
        "out-of-memory killer and kill -9 send SIGKILL; Ray restarts its actor, and "
        "setup runs again)\n"
    )


def _crashed(signum: int, dump: str, mem_limit: int | None) -> Outcome:
    """The outcome of a job whose process a signal ended; its stderr: what Python's
    faulthandler wrote as it died (the job's frames), if anything."""
    now = time.time()
    return Outcome(
        JobStatus.Terminated,
        stderr=dump,
        exception=_crash_text(signum, mem_limit),
        start_time=now,
        end_time=now,
    )
