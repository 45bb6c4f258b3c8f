"""A `JobCluster`'s side of `dispynb.backends.base.JobEvents`: the engine's reports
of nodes and jobs (on the I/O thread) applied to the job table and the nodes, and
passed on to the callbacks, the listeners and the journal."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from dispynb._clusterstate import _ClusterState
from dispynb.backends.base import Departure, NodeInfo, Outcome
from dispynb.errors import JournalError
from dispynb.job import DispyJob, JobStatus
from dispynb.node import DispyNode, DispyNodeAvailInfo
from dispynb.tracebacks import DYNAMIC_CODE, explain_missing_module

logger = logging.getLogger("dispynb.cluster")

#: Seconds between the AvailInfo a ``cluster_status`` callback is told of a node when
#: the cluster gave no ``pulse_interval``: dispy's nodes pulse every 10 minutes then
#: (dispynb's every second, for liveness: too often for a user's callback).
AVAIL_INFO_INTERVAL = 600.0


class _Events(_ClusterState):
    """The engine's events, applied (`dispynb.backends.base.JobEvents`): each
    ``JobEvents.name`` is ``_name`` here, out of the cluster's public API (what
    ``help(JobCluster)`` shows is dispy's); `EngineEvents` hands them to the
    engine."""

    def _node_ready(self, info: NodeInfo) -> None:
        node = self._resetting.pop(info.node_id, None)
        if node is None:
            node = DispyNode(
                info.host, info.name, info.cpus, port=info.port, platform=info.platform
            )
        else:  # set up again (resetup_node): same node, its counts kept
            node.cpus = info.cpus
            node.update_time = time.time()
        # What the node offers, of which it uses ``cpus`` (NodeAllocate), as dispy's.
        node.avail_cpus = max(info.offered, info.cpus)
        node.avail_info = info.avail
        self._nodes[info.node_id] = node
        self._released_nodes.pop(info.node_id, None)  # listed as the new one
        self._node_cpus[info.node_id] = info.cpus
        self._avail_told[info.node_id] = time.monotonic()
        self._journal.node(info.via or info.node_id)
        if info.node_id in self._limits_pending:  # limited as it was set up again
            used = self._limits_pending.pop(info.node_id)
            self._apply_limit(info.node_id, used, tell=False)  # (Initialized tells)
        self._notify_cluster(DispyNode.Initialized, node, None)
        self._emit(DispyNode.Initialized, node, None)

    def _node_closed(self, info: NodeInfo, reason: str, departure: Departure) -> None:
        if departure is Departure.LOST:  # its engine forgets its limit too
            self._limits_pending.pop(info.node_id, None)
        node = self._nodes.pop(info.node_id, None)
        if node is None:
            if departure is not Departure.RESETUP:
                # Gone as it was set up again (resetup_node, or close_node,
                # allocate_node, close_node): cluster_status hears of it now, as
                # its new setup began it heard nothing (as dispy's).
                node = self._resetting.pop(info.node_id, None)
                if node is not None:
                    self._notify_cluster(DispyNode.Closed, node, None)
            return
        if departure is not Departure.RESETUP:
            self._deallocated.discard(info.node_id)  # if it comes back: set up anew
        if departure is Departure.RESETUP:
            self._resetting[info.node_id] = node
        elif self._closed:
            pass
        elif departure is Departure.RELEASED:
            logger.info("node %s released (close_node)", info.node_id)
            self._released_nodes[info.node_id] = node
        elif self._nodes or not self._outstanding:
            logger.warning("node %s left: %s", info.node_id, reason)
        else:  # else the user's job() and wait() would just hang, saying nothing
            logger.warning(
                "node %s left: %s; no node left: %d unfinished jobs wait until one "
                "joins or comes back",
                info.node_id,
                reason,
                self._outstanding,
            )
        if departure is not Departure.RESETUP:  # dispy's says Initialized only
            self._notify_cluster(DispyNode.Closed, node, None)
        self._emit(DispyNode.Closed, node, None)

    def _node_status(self, info: NodeInfo, avail: DispyNodeAvailInfo | None) -> None:
        node = self._nodes.get(info.node_id)
        if node is None:
            return
        node.avail_info = avail
        node.update_time = time.time()
        if self._avail_due(info.node_id):
            self._notify_cluster(DispyNode.AvailInfo, node, None)
        self._emit(DispyNode.AvailInfo, node, None)

    def _avail_due(self, node_id: str) -> bool:
        """Whether ``cluster_status`` hears of this node's resources now: at every
        report if the cluster gave ``pulse_interval`` (its nodes report at that
        pace), as dispy's nodes pulse; else once per `AVAIL_INFO_INTERVAL`."""
        if self._options.pulse_interval:
            return True
        now = time.monotonic()
        if now - self._avail_told.get(node_id, now) < AVAIL_INFO_INTERVAL:
            return False
        self._avail_told[node_id] = now
        return True

    def _node_counts(
        self, info: NodeInfo, jobs_done: int, busy: int, cpu_time: float
    ) -> None:
        node = self._nodes.get(info.node_id)
        if node is None:
            return
        node.jobs_done, node.busy, node.cpu_time = jobs_done, busy, cpu_time
        node.update_time = time.time()
        self._emit(DispyNode.AvailInfo, node, None)

    def _jobs_sent(self, keys: list[int], info: NodeInfo) -> None:
        # On the loop thread, or on a submitting thread holding the loop (it sent
        # the jobs itself; see dispynb.backends.base, "Threads"): the journal is
        # thread-safe, and records them as sent when they are.
        self._journal.sent(keys, info.node_id)
        # As dispy's, a job names its node from dispatch on, before its start is
        # reported: `close` names where an unanswered job was left.
        jobs, host = self._jobs, info.host
        if not host:  # sent where they wait to be placed (a shared scheduler)
            return
        for key in keys:
            job = jobs.get(key)
            if job is not None and job.status is JobStatus.Created:
                job.ip_addr = host

    def _job_running(self, key: int, info: NodeInfo, start_time: float) -> None:
        job = self._jobs.get(key)
        # Only once per attempt: a job's start may be reported again after its worker
        # was replaced (it runs again from the start).
        if job is None or job.status is not JobStatus.Created:
            return
        # Counted busy before its status says Running: another thread that sees
        # it Running (a monitor, the lab panel) sees it counted too.
        node = self._nodes.get(info.node_id)
        if node is not None:
            node.busy += 1
            self._executing[key] = node
        job._node = node
        if not job._set_running(info.host, start_time):
            self._not_executing(key)  # it ended meanwhile (cancelled)
            return
        if self._options.cluster_status is not None:
            self._notify_cluster(JobStatus.Running, node, copy.copy(job))
        if self._listeners:  # tested here: no call per job without monitors
            self._emit(JobStatus.Running, node, job)

    def _not_executing(self, key: int) -> None:
        """Job ``key`` no longer runs where it was counted busy."""
        node = self._executing.pop(key, None)
        if node is not None:
            node.busy -= 1

    def _job_provisional(self, key: int, info: NodeInfo, result: Any) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        if job.status is JobStatus.Created:  # a node that does not report starts
            self._job_running(key, info, time.time())
        if not job._set_provisional(result):
            return
        opts = self._options
        if opts.job_status is not None:
            self._callbacks.post(opts.job_status, copy.copy(job))
        if opts.cluster_status is not None:
            node = self._nodes.get(info.node_id)
            self._notify_cluster(JobStatus.ProvisionalResult, node, copy.copy(job))
        self._emit(JobStatus.ProvisionalResult, self._nodes.get(info.node_id), job)

    def _job_done(self, key: int, info: NodeInfo | None, outcome: Outcome) -> None:
        job = self._jobs.pop(key, None)
        if job is None:
            return
        self._not_executing(key)
        start, end = outcome.start_time, outcome.end_time
        if outcome.status is JobStatus.Cancelled and not start and not job.start_time:
            # Sent ahead to a node, cancelled before it started: in dispy it
            # was still queued, so it names no node and no node counts it.
            job.ip_addr = None
            info = None
        if not start and job.start_time is not None:
            # Stopped while it ran (cancel, crash): the node reports no times, and
            # the job ran from the start it reported. dispy counts this time too.
            start, end = job.start_time, end or time.time()
        run_time = max(end - start, 0.0) if start else 0.0
        node = None
        if info is not None and (node := self._nodes.get(info.node_id)) is not None:
            node.jobs_done += 1
            if self._backend is not None:
                node.tx, node.rx = self._backend.traffic(info.node_id)
            node.cpu_time += run_time
        self.cpu_time += run_time
        job._node = node
        exception = outcome.exception
        if exception is not None:  # a failure: no call per successful job
            exception = explain_missing_module(self._sources.rerender(exception) or "")
            exception = self._sources.explain_missing_global(exception)
        stderr = outcome.stderr
        if isinstance(stderr, str) and DYNAMIC_CODE in stderr:  # warnings, tracebacks
            stderr = self._sources.rerender(stderr) or stderr
        job._complete(
            outcome.status,
            result=outcome.result,
            stdout=outcome.stdout,
            stderr=stderr,
            exception=exception,
            start_time=start or None,
            end_time=end or None,
            ip_addr=info.host if info is not None else None,
        )
        self._finished(job, node)

    def _job_abandoned(self, key: int, info: NodeInfo | None, reason: str) -> None:
        job = self._jobs.pop(key, None)
        if job is None:
            return
        self._not_executing(key)
        node = self._nodes.get(info.node_id) if info is not None else None
        # The node it was sent to, started or not (dispy sets ip_addr at dispatch).
        ip_addr = info.host if info is not None else None
        job._node = node
        job._complete(JobStatus.Abandoned, exception=reason, ip_addr=ip_addr)
        self._finished(job, node)

    def _job_requeued(self, key: int) -> None:
        job = self._jobs.get(key)
        if job is not None:
            node = self._executing.get(key)  # the node it was lost with
            self._not_executing(key)
            started = job.status is not JobStatus.Created
            job._requeue()
            if started and self._options.cluster_status is not None:
                # dispy's words (reschedule_jobs): Abandoned, on the node it ran on,
                # the job's copy Created (it waits to run again); else
                # cluster_status saw a second Running with nothing between.
                self._notify_cluster(JobStatus.Abandoned, node, copy.copy(job))
            self._emit(JobStatus.Created, None, job)

    def _job_cancelled(self, key: int) -> None:
        job = self._jobs.pop(key, None)
        if job is not None:
            job._complete(JobStatus.Cancelled, exception="cancelled before it ran")
            self._finished(job, None)

    def _jobs_cancelled(self, keys: list[int]) -> None:
        """`_job_cancelled` of each of ``keys`` (a Stop of a whole run), in one go:
        journaled in one transaction, told to the callbacks in one post."""
        if self._batch_depth:  # journaled with the batch's other ends
            for key in keys:
                self._job_cancelled(key)
            return
        pop, ended, done = self._jobs.pop, [], []
        for key in keys:
            job = pop(key, None)
            if job is not None:
                job._complete(JobStatus.Cancelled, exception="cancelled before it ran")
                ended.append(key)
                done.append(job)
        if not done:
            return
        if self._journal.jobs:  # a failure is logged by the journal, as `done`'s
            self._journal.done_many(list(zip(ended, done, strict=True)))
        self._announce_cancelled(ended, done)

    def _announce_cancelled(self, keys: list[int], jobs: list[DispyJob]) -> None:
        """`_announce` of jobs cancelled before they ran (``keys``), all at once."""
        opts = self._options
        job_status, cluster_status = opts.job_status, opts.cluster_status
        cancelled = JobStatus.Cancelled
        callbacks = self._callbacks
        # Each callback gets its own copy of each job, as dispy's, made on the
        # callback thread as it calls it (the job's status is final: the same
        # copy); a notebook run that passes no job on gets the jobs themselves.
        if job_status is not None:
            callbacks.post_each(job_status, ((copy.copy(job),) for job in jobs))
        if cluster_status is not None:
            owner = getattr(cluster_status, "__self__", None)
            together = getattr(owner, "_jobs_cancelled", None)
            if forwards_events(cluster_status):
                calls = ((cancelled, None, copy.copy(job)) for job in jobs)
                callbacks.post_each(cluster_status, calls)
            elif together is not None:  # a notebook run's: counted together
                callbacks.post(together, jobs)
            else:
                callbacks.post_each(
                    cluster_status, ((cancelled, None, job) for job in jobs)
                )
        self.job_counts[cancelled._name_] += len(jobs)
        if self._listeners:
            for job in jobs:
                self._emit(cancelled, None, job)
        asked = self._cancel_asked
        if asked:  # forgotten once the callbacks have heard (`_forget_cancel`)
            if job_status is None and cluster_status is None:
                asked.difference_update(keys)
            else:
                callbacks.post(asked.difference_update, keys)
        with self._outstanding_lock:
            self._outstanding -= len(jobs)
            all_done = self._outstanding == 0
            if all_done:
                self.end_time = time.time()
        if all_done:
            self._all_done.wake_all()

    def _batch(self) -> _Batch:
        """The events reported inside ``with events.batch():`` came together (the
        results of one message from a node): the jobs that end there are journaled
        in one transaction as it exits, then announced (`JobEvents.batch`); if
        they could not be journaled (a full disk), it then raises `JournalError`."""
        return self._batch_context

    def _finished(self, job: DispyJob, node: DispyNode | None) -> None:
        if self._journal.jobs and job._key is not None:
            if self._batch_depth:
                self._ending.append((job._key, job, node))
                return
            self._journal.done(job._key, job)
        self._announce(job, node)

    def _end_batch(self) -> None:
        """Journal the jobs that ended in a batch (one transaction), then tell of
        them: a callback, ``wait()`` or a monitor hears of a job once it is
        journaled, as when it is journaled alone."""
        ending, self._ending = self._ending, []
        journaled = False
        try:
            journaled = self._journal.done_many([(k, job) for k, job, _ in ending])
        finally:
            for _key, job, node in ending:
                self._announce(job, node)
        if not journaled:  # logged by the journal; the backend acknowledges none
            raise JournalError(
                f"the ends of {len(ending)} jobs could not be written to the "
                "recovery file"
            )

    def _announce(self, job: DispyJob, node: DispyNode | None) -> None:
        """Tell callbacks, monitors and waiters that ``job`` ended."""
        opts = self._options
        if opts.job_status is not None:
            self._callbacks.post(opts.job_status, copy.copy(job))
        if opts.cluster_status is not None:
            self._notify_cluster(job.status, node, copy.copy(job))
        status = job.status
        self.job_counts[status._name_] += 1  # not .name: an enum property per job
        if self._listeners:
            self._emit(status, node, job)
        if self._cancel_asked and job._key in self._cancel_asked:
            self._forget_cancel(job._key)
        with self._outstanding_lock:
            self._outstanding -= 1
            all_done = self._outstanding == 0
            if all_done:
                self.end_time = time.time()
        if all_done:
            self._all_done.wake_all()

    def _forget_cancel(self, key: int) -> None:
        """Forget that a cancel was asked for job ``key`` (`_cancel_requested`)
        once what follows the cluster has heard of its end: its listeners have,
        its callbacks run in order on their thread."""
        opts = self._options
        if opts.job_status is None and opts.cluster_status is None:
            self._cancel_asked.discard(key)
        else:
            self._callbacks.post(self._cancel_asked.discard, key)


def forwards_events(cluster_status: Callable[..., Any]) -> bool:
    """Whether ``cluster_status`` may pass the jobs it gets on, or look at events it
    does not count: False only for a notebook run's (`dispynb.jupyter.run.Run`)
    that has no callback nor listener of its own to pass them to (its
    ``forwards_events()`` says so). The cluster then need not copy the jobs of
    final events for it, nor tell it of ``Created``, which it ignores."""
    owner = getattr(cluster_status, "__self__", None)
    forwards = getattr(owner, "forwards_events", None)
    return forwards is None or bool(forwards())


class _Batch:
    """`_Events._batch`'s context (one per cluster; batches may nest)."""

    __slots__ = ("_events",)

    def __init__(self, events: _Events) -> None:
        self._events = events

    def __enter__(self) -> None:
        self._events._batch_depth += 1

    def __exit__(self, *exc_info: object) -> None:
        events = self._events
        events._batch_depth -= 1
        if not events._batch_depth and events._ending:
            events._end_batch()


class EngineEvents:
    """The `JobEvents` a cluster hands its engine (`Engine.open`): its ``_name``
    handlers under the protocol's names, so that they need not be public methods
    of `JobCluster` (a dispy program's ``help`` and ``dir`` show dispy's API)."""

    node_ready: Callable[[NodeInfo], None]
    node_status: Callable[[NodeInfo, DispyNodeAvailInfo | None], None]
    node_closed: Callable[[NodeInfo, str, Departure], None]
    node_counts: Callable[[NodeInfo, int, int, float], None]
    jobs_sent: Callable[[list[int], NodeInfo], None]
    job_running: Callable[[int, NodeInfo, float], None]
    job_provisional: Callable[[int, NodeInfo, Any], None]
    job_done: Callable[[int, NodeInfo | None, Outcome], None]
    job_abandoned: Callable[[int, NodeInfo | None, str], None]
    job_cancelled: Callable[[int], None]
    jobs_cancelled: Callable[[list[int]], None]
    job_requeued: Callable[[int], None]
    batch: Callable[[], _Batch]

    def __init__(self, cluster: _Events) -> None:
        for name in self.__annotations__:
            setattr(self, name, getattr(cluster, f"_{name}"))
