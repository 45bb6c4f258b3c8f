"""The Ray engine's jobs: queued here (for any node, or for one: ``submit_node``),
handed to idle actors (`DEPTH` calls in flight each), their completions settled on
the loop, their limits enforced, cancels and lost actors settled."""

from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Any

from dispynb.backends._raystate import (
    _check_picklable,
    _RayState,
    _reason,
    _Slot,
    _terminated,
)
from dispynb.backends.base import JobRequest, Outcome
from dispynb.errors import NotSupportedError
from dispynb.job import JobStatus

#: Calls of ``run`` in flight per actor at least: the running job and the next one.
DEPTH = 2

#: Calls in flight per actor at most (for jobs that take microseconds).
MAX_DEPTH = 32

#: Seconds of work queued on each actor behind its running job: short jobs get more
#: calls in flight, so that an actor never waits for the client's next call.
QUEUED_WORK = 0.02

#: Seconds a job's outcome waits for the provisional results it says it sent.
PROVISIONAL_WAIT = 10.0

#: Jobs that recently ran shorter than this on average go to the actors in batches
#: (one Ray call runs several): Ray's cost per call is then shared by the batch.
BATCH_UNDER = 0.002

#: Characters (str) or bytes an argument of a job in a batch may have at most; a
#: larger one travels alone, through Ray's object store.
SMALL_ARG = 4096

#: Seconds an actor's running call must have run, while the recent jobs were short
#: (more than `DEPTH` calls in flight), before the calls waiting behind it are taken
#: back for an idle actor (`_steal`): short jobs' queues empty by themselves.
STALLED = 0.1

_SCALARS = frozenset({int, float, bool, complex, type(None)})


class _Jobs(_RayState):
    """The jobs' way through the actors, from ``submit`` to their final event."""

    def prepare(self, job: JobRequest) -> None:
        """Check that the arguments pickle (values of plain types are not pickled
        twice: Ray pickles them once on the way)."""
        if job.depends:
            raise NotSupportedError(
                "dispy_job_depends is not supported on the 'ray' engine: give the "
                "cluster's depends, or pass the data as arguments"
            )
        for index, value in enumerate(job.args):
            _check_picklable(value, f"argument {index + 1}")
        for name, value in job.kwargs.items():
            _check_picklable(value, f"keyword argument {name!r}")

    def submit(self, job: JobRequest) -> None:
        self._incoming.append(job)  # deque.append is atomic
        self._pump.trigger()

    def cancel(
        self, keys: list[int], unstarted: bool = False, held: bool = False
    ) -> None:
        if held:  # on the loop thread: only jobs no actor has, reported now
            self._take_incoming()
            self._cancel_queued(set(keys))
            return
        self._to_cancel.append((list(keys), unstarted))
        self._pump.trigger()

    def node_load(self) -> dict[str, tuple[int, int]]:
        """``(cpus, jobs)`` of each Ray node set up: its live actors, the jobs
        handed to them."""
        if self._runner.in_loop_thread():
            return self._load()

        async def load() -> dict[str, tuple[int, int]]:
            return self._load()

        return self._runner.run_sync(load, timeout=30)

    def running_jobs(self, node_id: str) -> list[int]:
        """Keys of the jobs running on a Ray node now (the running call of each of
        its actors: one job, or a batch of short ones)."""

        async def keys() -> list[int]:
            node = self._nodes.get(node_id)
            if node is None:
                return []
            return sorted(
                key
                for s in node.slots
                if s.inflight
                for key, _, ref in s.inflight
                if ref is s.inflight[0][2]
            )

        return self._runner.run_sync(keys, timeout=30)

    def _load(self) -> dict[str, tuple[int, int]]:
        return {
            node.ray_id: (
                0 if node.closed else sum(1 for s in node.slots if not s.dead),
                sum(len(s.inflight) for s in node.slots),
            )
            for node in self._nodes.values()
            if node.info is not None
        }

    def _take_incoming(self) -> None:
        incoming = self._incoming
        while incoming:
            job = incoming.popleft()
            self._jobs[job.key] = job
            self._enqueue(job)

    def _enqueue(self, job: JobRequest, first: bool = False) -> None:
        """Queue ``job`` here: for any node, or for its own (``submit_node``)."""
        if job.node_id is None:
            queue = self._queue
        else:
            node = self._nodes.get(job.node_id)
            if node is None or node.closed:
                self._forget(job.key)
                self._events.job_abandoned(
                    job.key,
                    node.info if node is not None else None,
                    "its Ray node (submit_node) has left the cluster",
                )
                return
            queue = self._pinned.setdefault(job.node_id, collections.deque())
        if first:
            queue.appendleft(job)
        else:
            queue.append(job)

    def _next_job(self, slot: _Slot) -> JobRequest | None:
        """The job ``slot`` runs next: one for its node first, then any."""
        if self._pinned:
            pinned = self._pinned.get(slot.node.ray_id)
            if pinned:
                return pinned.popleft()
        return self._queue.popleft() if self._queue else None

    def _schedule(self) -> None:
        """On the loop: take in new jobs and cancels, then feed idle actors."""
        if self._closed:
            return
        self._take_incoming()
        if self._no_worker is not None:
            self._abandon_waiting()
        while self._to_cancel:
            keys, unstarted = self._to_cancel.popleft()
            for key in self._cancel_queued(set(keys)):
                self._cancel_sent(key, unstarted)
        if self._pinned:
            self._pinned = {k: q for k, q in self._pinned.items() if q}
        if not self._queue and not self._pinned:
            self._steal()
            return
        depth = self._depth()
        slots = [s for s in self._slots if s.ready and len(s.inflight) < depth]
        if depth > DEPTH:  # short jobs: none queued behind a call that runs long
            stalled = time.monotonic() - STALLED
            slots = [s for s in slots if not s.inflight or s.since > stalled]
        if not slots:
            return
        # Fill the emptiest actors first: one job each, then a second one each, but
        # only once every actor is up (a job queued behind a running one would wait
        # for it while an actor still being set up becomes free).
        slots.sort(key=lambda s: len(s.inflight))
        starting = any(not s.ready and not s.dead for s in self._slots)
        unit = self._batch_size(depth, slots)
        for level in range(0, 1 if starting else depth, unit):
            for slot in slots:
                if len(slot.inflight) <= level:
                    job = self._next_job(slot)
                    if job is None:
                        if not self._pinned and not self._queue:
                            return
                        continue
                    batch = self._take_batch(job, min(unit, depth - level))
                    if batch:
                        self._send_batch(slot, batch)
                    else:
                        self._send(slot, job)

    def _batch_size(self, depth: int, slots: list[_Slot]) -> int:
        """Jobs per Ray call: 1, or for jobs that run for less than `BATCH_UNDER`
        half the calls in flight (a batch runs while the next one waits), no more
        than the queue spread over the actors."""
        run_time = self._run_time
        if run_time is None or run_time >= BATCH_UNDER or len(self._queue) < 2:
            return 1
        spread = -(-len(self._queue) // len(slots))
        return max(1, min(depth // 2, spread))

    def _take_batch(self, first: JobRequest, size: int) -> list[JobRequest]:
        """``first`` and the small jobs after it in the queue (``size`` in all at
        most), if ``first`` may go in a batch; else an empty list."""
        if size < 2 or not self._queue or not _batchable(first):
            return []
        batch = [first]
        queue = self._queue
        while queue and len(batch) < size and _batchable(queue[0]):
            batch.append(queue.popleft())
        return batch if len(batch) > 1 else []

    def _depth(self) -> int:
        """Calls to keep in flight per actor: `QUEUED_WORK` seconds of jobs as long
        as the recent ones took (`DEPTH` before any ended, or for long jobs)."""
        run_time = self._run_time
        if run_time is None:
            return DEPTH
        calls = 1 + int(QUEUED_WORK / max(run_time, QUEUED_WORK / MAX_DEPTH))
        return max(DEPTH, min(MAX_DEPTH, calls))

    def _steal(self) -> None:
        """Nothing waits here but an actor is idle: take back the jobs of a call
        waiting behind another actor's running job (its actor skips them,
        `_ask_skip`; they are queued again here once the actor confirms), so that
        they do not wait for it: the last call of the actor holding the most, one
        call per idle actor; or, from a batch whose jobs run long, the jobs after
        its first (those that had begun run on)."""
        idle = sum(1 for s in self._slots if s.ready and not s.inflight)
        if not idle:
            return
        stalled = time.monotonic() - STALLED if self._depth() > DEPTH else None
        busy = sorted(self._slots, key=lambda s: len(s.inflight), reverse=True)
        for slot in busy:
            if idle == 0:
                return
            inflight = slot.inflight
            if len(inflight) < 2:
                continue  # nothing waits behind its running job
            if stalled is not None and slot.since > stalled:
                if self._steal_timer is None:  # look again once it may be
                    self._steal_timer = self._runner.loop.call_later(
                        slot.since - stalled, self._look_again
                    )
                continue  # a short job's: the queue behind it empties soon
            last = inflight[-1][2]
            keys = [
                key
                for key, _, ref in list(inflight)[1:]
                if ref is last
                and key not in self._skipping
                and key not in self._cancelling
                and key not in self._begun_keys
                and key in self._jobs
                and self._jobs[key].node_id is None  # else it may run only there
            ]
            for key in keys:
                self._ask_skip(slot, key, "steal")
            idle -= 1 if keys else 0

    def _look_again(self) -> None:
        self._steal_timer = None
        self._schedule()

    def _send(self, slot: _Slot, job: JobRequest) -> None:
        key = job.key
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        # Each argument its own: Ray puts a large one in its object store alone. The
        # usual job (first attempt, no keyword arguments or memory limit) sends its
        # key only: one small value less for Ray to serialize per call.
        # Ray hands a bytearray argument over as bytes (ray-project/ray#12648):
        # the actor makes it a bytearray again.
        bytearrays = [i for i, arg in enumerate(job.args) if type(arg) is bytearray]
        args, kwargs = job.args, job.kwargs
        # ObjectRefs Ray would resolve as a task's arguments (keyword arguments,
        # an executor's calls') go as the Ray call's own: Ray gives their objects.
        places, refs = _lift_refs(args, self._ray) if self._calls else ([], [])
        named = _named_refs(kwargs, self._ray) if kwargs else []
        head: int | tuple[Any, ...]
        if places or named:
            if places:
                args = _without(args, places)
            if named:
                refs += [kwargs[name] for name in named]
                kwargs = {k: None if k in named else v for k, v in kwargs.items()}
            args = (*args, *refs)
            head = (key, attempt, job.mem_limit, kwargs, bytearrays, places, named)
        elif bytearrays:
            head = (key, attempt, job.mem_limit, job.kwargs, bytearrays)
        elif attempt == 1 and job.mem_limit is None and not job.kwargs:
            head = key
        else:
            head = (key, attempt, job.mem_limit, job.kwargs)
        try:
            ref = slot.handle.run.remote(head, *args)
        except Exception as exc:  # Ray could not serialize the arguments
            self._jobs.pop(key, None)
            self._events.job_done(
                key,
                None,
                _terminated(f"the job's arguments could not be sent to Ray: {exc}\n"),
            )
            return
        slot.inflight.append((key, attempt, ref))
        self._where[key] = slot
        self._sent.pop(key, None)
        self._early.pop(key, None)
        calls = ((key, attempt),)
        ref.future().add_done_callback(
            lambda fut: self._completed(slot, calls, False, fut)
        )
        if len(slot.inflight) == 1:
            self._started_running(slot)

    def _send_batch(self, slot: _Slot, jobs: list[JobRequest]) -> None:
        """Send ``jobs`` to ``slot`` in one Ray call (`JobActor.run_batch`)."""
        items = []
        calls = []
        for job in jobs:
            key = job.key
            attempt = self._attempts.get(key, 0) + 1
            self._attempts[key] = attempt
            calls.append((key, attempt))
            items.append(((key, attempt, job.mem_limit, job.kwargs), job.args))
        try:
            ref = slot.handle.run_batch.remote(items)
        except Exception:  # Ray could not serialize one: each alone says which
            for job in jobs:
                self._attempts[job.key] -= 1
                self._send(slot, job)
            return
        self._batches_sent += 1
        first = not slot.inflight
        for key, attempt in calls:
            slot.inflight.append((key, attempt, ref))
            self._where[key] = slot
            self._sent.pop(key, None)
            self._early.pop(key, None)
        frozen = tuple(calls)
        ref.future().add_done_callback(
            lambda fut: self._completed(slot, frozen, True, fut)
        )
        if first:
            self._started_running(slot)

    def _completed(
        self,
        slot: _Slot,
        calls: tuple[tuple[int, int], ...],
        batch: bool,
        fut: concurrent.futures.Future[Any],
    ) -> None:
        """On a Ray thread: hand the completion of a call (its ``(key, attempt)``
        jobs) to the loop, one wake-up for all that arrive meanwhile. Results the
        actor pickled are loaded here, not on the loop."""
        fut = _results_loaded(fut, batch)
        with self._completions_lock:
            wake = not self._completions
            self._completions.append((slot, calls, batch, fut))
        if wake:
            self._post(self._drain_completions)

    def _drain_completions(self) -> None:
        with self._completions_lock:
            completions = list(self._completions)
            self._completions.clear()
        for slot, calls, batch, fut in completions:
            if batch:
                self._done_batch(slot, calls, fut)
            else:
                key, attempt = calls[0]
                self._done(slot, key, attempt, fut)
        self._schedule()

    def _done_batch(
        self,
        slot: _Slot,
        calls: tuple[tuple[int, int], ...],
        fut: concurrent.futures.Future[Any],
    ) -> None:
        """Settle the jobs of a batch call: each with its own outcome."""
        if self._closed:
            return
        live = [
            (key, attempt)
            for key, attempt in calls
            if self._where.get(key) is slot and self._attempts.get(key) == attempt
        ]
        if not live:
            return
        ray = self._ray
        try:
            replies = fut.result()
        except ray.exceptions.RayActorError as exc:
            self._actor_lost(slot, _reason(exc))
            return
        except Exception as exc:  # the call failed in Ray
            for key, _ in live:
                self._remove(slot, key)
                self._forget(key)
                self._events.job_done(key, slot.node.info, _terminated(_failed(exc)))
            return
        replies_by_key = {
            key: reply for (key, _), reply in zip(calls, replies, strict=True)
        }
        for key, attempt in live:
            self._remove(slot, key)
            self._settle(slot, key, attempt, replies_by_key[key])

    def _done(
        self, slot: _Slot, key: int, attempt: int, fut: concurrent.futures.Future[Any]
    ) -> None:
        if self._closed or self._where.get(key) is not slot:
            return
        if self._attempts.get(key) != attempt:
            return
        ray = self._ray
        try:
            reply = fut.result()
        except ray.exceptions.RayActorError as exc:
            self._actor_lost(slot, _reason(exc))
            return
        except Exception as exc:  # the call failed in Ray (a result Ray cannot pickle)
            self._remove(slot, key)
            self._forget(key)
            self._events.job_done(key, slot.node.info, _terminated(_failed(exc)))
            return
        self._remove(slot, key)
        self._settle(slot, key, attempt, reply)

    def _settle(self, slot: _Slot, key: int, attempt: int, reply: Any) -> None:
        """Report the outcome of a job its actor ran (``JobActor.run``'s reply)."""
        code, result, stdout, stderr, exception, start, end, sent = reply
        from dispynb.backends._rayworker import FINISHED, SKIPPED

        if code == SKIPPED:  # (before the answer of its `_ask_skip`)
            self._skipped(key)
            return

        outcome = Outcome(
            JobStatus.Finished if code == FINISHED else JobStatus.Terminated,
            result=result,
            stdout=stdout,
            stderr=stderr,
            exception=exception,
            start_time=start,
            end_time=end,
        )
        if self._started.get(key) != attempt:
            self._events.job_running(key, self._view(slot.node), start)
        ran = end - start
        self._run_time = (
            ran if self._run_time is None else 0.8 * self._run_time + 0.2 * ran
        )
        if sent > self._sent.get(key, 0):
            # Its provisional results are still on their way through the inbox.
            timer = self._runner.loop.call_later(PROVISIONAL_WAIT, self._release, key)
            self._held[key] = (slot.node, outcome, sent, timer)
            return
        self._forget(key)
        self._events.job_done(key, slot.node.info, outcome)

    def _remove(self, slot: _Slot, key: int) -> None:
        """Take ``key`` out of its actor's calls; report the start of the next one."""
        inflight = slot.inflight
        head = inflight[0] if inflight else None
        was_head = head is not None and head[0] == key
        for index, item in enumerate(inflight):
            if item[0] == key:
                del inflight[index]
                break
        self._where.pop(key, None)
        if was_head:
            self._cancel_timer(slot)
        # The next call runs now (not the next job of the same batch: its own
        # start comes with its outcome).
        if was_head and inflight and head is not None and inflight[0][2] is not head[2]:
            self._started_running(slot)

    def _started_running(self, slot: _Slot) -> None:
        """The first call of ``slot`` runs now: report it, enforce its limits."""
        key, attempt, ref = slot.inflight[0]
        slot.since = time.monotonic()
        if key in self._skipping:
            return  # it may not run: the answer of its skip says (`_skip_answered`)
        if len(slot.inflight) > 1 and slot.inflight[1][2] is ref:  # a batch
            for item_key, _, item_ref in slot.inflight:
                if item_ref is ref and item_key in self._cancelling:
                    self._cancel_in_batch(slot, ref, item_key)
                    break
        elif key in self._cancelling:
            self._kill(slot, key)  # its cancel came too late to skip it
            return
        if self._started.get(key) != attempt:
            self._started[key] = attempt
            self._events.job_running(key, self._view(slot.node), time.time())
        timeout = self._jobs[key].timeout if key in self._jobs else None
        if timeout is not None:
            slot.timer = self._runner.loop.call_later(
                timeout, self._timed_out, slot, key
            )

    def _cancel_timer(self, slot: _Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None

    def _timed_out(self, slot: _Slot, key: int) -> None:
        slot.timer = None
        if slot.inflight and slot.inflight[0][0] == key:
            self._kill(slot, key, timed_out=True)


def _results_loaded(
    fut: concurrent.futures.Future[Any], batch: bool
) -> concurrent.futures.Future[Any]:
    """``fut`` (a call's, done), with the results of its replies loaded
    (`_rayworker.load_result`)."""
    from dispynb.backends._rayworker import load_result

    if fut.cancelled() or fut.exception() is not None:
        return fut
    reply = fut.result()
    loaded: concurrent.futures.Future[Any] = concurrent.futures.Future()
    loaded.set_result([load_result(r) for r in reply] if batch else load_result(reply))
    return loaded


def _small(value: Any) -> bool:
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is str or kind is bytes:
        return len(value) <= SMALL_ARG
    return False


def _failed(exc: BaseException) -> str:
    """The exception text of a job whose call failed in Ray, not in the job (which
    the actor reports itself)."""
    return (
        "Ray could not send the job's result back or load its arguments on the "
        f"worker: {_reason(exc)}\n"
    )


#: Where a call of an executor's job has an ObjectRef argument: ``(argument
#: position, call)`` in its columns, or the keyword's name.
Place = tuple[int, int] | str


def _lift_refs(args: tuple[Any, ...], ray: Any) -> tuple[list[Place], list[Any]]:
    """The ObjectRef arguments of an executor's job's calls (``args``: the
    runner's ``key, blob, count, columns, kwargs``), at the top level of a call
    as Ray resolves a task's (one in a list stays a handle), and their places.
    Given as the Ray call's own arguments, Ray hands the actor their objects
    (`_rayworker.put_back` puts them in their places): ``executor.submit(f,
    ref)`` runs ``f(obj)``, as ``f.remote(ref)`` does."""
    object_ref = ray.ObjectRef
    places: list[Place] = []
    refs: list[Any] = []
    columns, kwargs = args[3], args[4] if len(args) > 4 else None
    for position, column in enumerate(columns):
        for call, value in enumerate(column):
            if type(value) is object_ref:
                places.append((position, call))
                refs.append(value)
    for name, value in (kwargs or {}).items():
        if type(value) is object_ref:
            places.append(name)
            refs.append(value)
    return places, refs


def _named_refs(kwargs: dict[str, Any], ray: Any) -> list[str]:
    """The keyword arguments of a job that are ObjectRefs (Ray resolves those of
    ``f.remote(x=ref)``)."""
    object_ref = ray.ObjectRef
    return [name for name, value in kwargs.items() if type(value) is object_ref]


def _without(args: tuple[Any, ...], places: list[Place]) -> tuple[Any, ...]:
    """``args`` of an executor's job with None at ``places`` (the handles travel
    apart, as the Ray call's own arguments)."""
    key, blob, count, columns, kwargs = args
    columns = [list(column) for column in columns]
    kwargs = dict(kwargs or {})
    for place in places:
        if isinstance(place, str):
            kwargs[place] = None
        else:
            columns[place[0]][place[1]] = None
    return key, blob, count, tuple(columns), kwargs or None


def _batchable(job: JobRequest) -> bool:
    """Whether ``job`` may share a Ray call with others: small arguments of plain
    types (a large one goes alone, through Ray's object store), no ``job_timeout``
    (a timer per running call), any node."""
    if job.timeout is not None or job.node_id is not None:
        return False
    args = job.args
    if not all(_small(value) for value in args):
        return False
    return not job.kwargs or all(_small(value) for value in job.kwargs.values())
