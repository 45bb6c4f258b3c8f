"""The Ray engine's cancels: a job waiting here is dropped; one handed to an actor
behind its running call is skipped there (`JobActor.skip`, asked in the actor's
``control`` group, which runs beside the job), as are jobs taken back for an idle
actor (`_rayjobs._steal`); a running one is stopped by killing its actor."""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any

from dispynb.backends._raystate import _RayState, _Slot
from dispynb.backends.base import JobRequest

#: Seconds a cancelled job in a running batch may take to end before its actor is
#: killed (a batch holds only jobs expected to take milliseconds).
BATCH_CANCEL_WAIT = 2.0


class _Cancels(_RayState):
    """Cancel queued, waiting and running jobs; skip waiting ones on their actor."""

    def _cancel_in_batch(self, slot: _Slot, ref: Any, key: int) -> None:
        """``key`` is cancelled while its batch runs: its jobs are short, so give
        the batch `BATCH_CANCEL_WAIT` seconds to end (each of its jobs then ends as
        it did); kill its actor if it has not (``key`` ends Terminated)."""

        def stop() -> None:
            if slot.inflight and slot.inflight[0][2] is ref and key in self._jobs:
                self._kill(slot, key)

        self._runner.loop.call_later(BATCH_CANCEL_WAIT, stop)

    def _cancel_queued(self, keys: set[int]) -> set[int]:
        """Cancel the jobs of ``keys`` waiting here (one pass); the other keys."""
        if not keys or not (self._queue or self._pinned):
            return keys
        found: list[int] = []

        def keep(queue: collections.deque[JobRequest]) -> collections.deque[JobRequest]:
            kept: collections.deque[JobRequest] = collections.deque()
            for job in queue:
                if job.key in keys:
                    found.append(job.key)
                else:
                    kept.append(job)
            return kept

        self._queue = keep(self._queue)
        self._pinned = {node: keep(queue) for node, queue in self._pinned.items()}
        for key in found:
            self._forget(key)
            self._events.job_cancelled(key)
        return keys.difference(found)

    def _cancel_sent(self, key: int, unstarted: bool) -> None:
        """Cancel a job handed to an actor: skip it there if it has not begun;
        kill its actor if it runs (unless ``unstarted``: then it runs on)."""
        slot = self._where.get(key)
        if slot is None or key not in self._jobs or key in self._held:
            return
        running = slot.inflight[0][2] if slot.inflight else None
        ref = next((r for k, _, r in slot.inflight if k == key), None)
        if ref is None:
            return
        if ref is running:
            batch = len(slot.inflight) > 1 and slot.inflight[1][2] is ref
            if batch:  # its turn in the batch may not have come: skip it then
                self._ask_skip(slot, key, "unstarted" if unstarted else "cancel")
            elif not unstarted:
                self._cancelling.add(key)
                self._kill(slot, key)
            return
        self._ask_skip(slot, key, "unstarted" if unstarted else "cancel")

    def _ask_skip(self, slot: _Slot, key: int, why: str) -> None:
        """Ask ``slot``'s actor to skip job ``key``, waiting there behind its
        running call (``why``: see `_RayState._skipping`). ``ray.cancel`` does not
        drop a call queued on a busy actor (Ray 2.60 runs it when its turn comes,
        then discards its result), so the actor is told in its `CONTROL` group,
        which runs beside the job; its answer says whether the job had begun. The
        skips asked in one turn of the loop (a cancel of many jobs) go to each
        actor in one call (`_send_skips`)."""
        asked = key in self._skipping
        if why != "steal" or not asked:  # a cancel outweighs a steal
            self._skipping[key] = why
        if asked:
            return
        if not self._skip_asks:
            self._runner.loop.call_soon(self._send_skips)
        self._skip_asks.setdefault(slot, []).append((key, self._attempts[key]))

    def _send_skips(self) -> None:
        """Send the skips `_ask_skip` gathered: one call per actor."""
        from dispynb.backends._rayworker import CONTROL

        asks, self._skip_asks = self._skip_asks, {}
        for slot, asked in asks.items():
            jobs = [  # still waiting there to be skipped (not settled meanwhile)
                (key, attempt)
                for key, attempt in asked
                if key in self._skipping
                and self._where.get(key) is slot
                and self._attempts.get(key) == attempt
            ]
            if self._closed or not jobs:
                continue
            try:
                ref = slot.handle.skip.options(concurrency_group=CONTROL).remote(jobs)
            except Exception:  # (Ray is shutting down) as if the jobs had begun
                for key, _ in jobs:
                    self._begun(slot, key)
                continue
            self._skip_calls += 1
            ref.future().add_done_callback(
                lambda fut, slot=slot, jobs=jobs: self._post(
                    self._skips_answered, slot, jobs, fut
                )
            )

    def _skips_answered(
        self,
        slot: _Slot,
        jobs: list[tuple[int, int]],
        fut: concurrent.futures.Future[Any],
    ) -> None:
        """The actor's answers to `_send_skips`'s call for ``jobs``."""
        skipped = [
            self._skip_answered(slot, key, attempt, fut, index)
            for index, (key, attempt) in enumerate(jobs)
        ]
        if any(skipped):
            self._schedule()

    def _skip_answered(
        self,
        slot: _Slot,
        key: int,
        attempt: int,
        fut: concurrent.futures.Future[Any],
        index: int,
    ) -> bool:
        """The actor's answer about job ``key`` (``index`` in its call's answers):
        the job is skipped there (it ends Cancelled, or is queued again here:
        True), or it had begun (a cancel then stops it as a running job, when it
        runs)."""
        if self._closed or key not in self._skipping:
            return False  # settled meanwhile: its call ended first (SKIPPED or not)
        if self._where.get(key) is not slot or self._attempts.get(key) != attempt:
            return False
        try:
            skipped = bool(fut.result()[index])
        except self._ray.exceptions.ActorUnavailableError:  # for now: it may be back
            self._begun(slot, key, unanswered=True)
            return False
        except self._ray.exceptions.RayActorError:
            return False  # the actor is lost: its calls fail (`_fail_inflight`)
        except Exception:  # no answer: whether it had begun is not known
            self._begun(slot, key, unanswered=True)
            return False
        if skipped:
            self._remove(slot, key)  # its call replies SKIPPED, ignored then
            self._skipped(key)
            return True
        self._begun(slot, key)
        return False

    def _begun(self, slot: _Slot, key: int, unanswered: bool = False) -> None:
        """Job ``key`` runs (or ran) on ``slot`` though its skip was asked: a
        cancel stops it as a running job; its start, held for the answer, is
        reported. ``unanswered``: the skip got no answer, so its call may still
        reply skipped (`_skipped` then knows why it was asked)."""
        why = self._skipping.pop(key)
        self._begun_keys.add(key)
        if unanswered:
            self._unanswered[key] = why
        if why == "cancel":
            self._cancelling.add(key)
        ref = next(r for k, _, r in slot.inflight if k == key)
        if slot.inflight[0][0] == key:  # its start waited for this answer
            self._started_running(slot)
        elif why == "cancel" and slot.inflight[0][2] is ref:  # in a running batch
            self._cancel_in_batch(slot, ref, key)

    def _skipped(self, key: int) -> None:
        """Job ``key``'s actor skipped it: it ends Cancelled, or is queued again."""
        why = self._skipping.pop(key, None) or self._unanswered.pop(key, None)
        if why == "steal":
            self._enqueue(self._jobs[key], first=True)
        else:
            self._forget(key)
            self._events.job_cancelled(key)
