"""Client-side job scheduling as a pure state machine: events in, instructions out.

`SchedulerState` keeps the jobs waiting for a CPU, the jobs in flight on each node
(with their attempt numbers) and each node's pipeline window. `SchedulerState.handle`
applies one event and returns what the driver must do. There is no I/O, no clock and
no randomness: the same events always give the same instructions.

Contents:

- `SchedulerState`: the state machine;
- `NodeInfo`: a read-only snapshot of one node, for displays and tests;
- `attempts_spent`: the reason given for a job that used up its attempts.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from dispynb.scheduler import policy
from dispynb.scheduler.events import (
    AbandonJob,
    AcceptResult,
    CancelQueued,
    CancelRequested,
    CancelRunning,
    DropQueued,
    Event,
    Instruction,
    JobFinished,
    JobReturned,
    JobSubmitted,
    NodeJoined,
    NodeLeft,
    ResubmitJob,
    SendJobs,
)

__all__ = ["NodeInfo", "SchedulerState", "attempts_spent"]

logger = logging.getLogger(__name__)

#: A FIFO of job keys with O(1) removal anywhere and O(1) insertion at the front.
_Queue: TypeAlias = OrderedDict[int, None]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A snapshot of one node as the scheduler sees it.

    Attributes
    ----------
    node
        The node id.
    cpus
        CPUs the node offers to this computation.
    running
        Jobs sent to the node and not yet finished.
    window
        The most jobs the node may hold at once (see `policy.window`).
    mean_duration
        Moving average of recent job durations on the node, in seconds, or None.
    """

    node: str
    cpus: int
    running: int
    window: int
    mean_duration: float | None


def attempts_spent(lost_on: tuple[str, ...], last: str) -> str:
    """Why a job that died with its node on every attempt is abandoned.

    ``lost_on`` names the node of each attempt, in order; ``last`` says how the last
    one was lost.

    >>> print(attempts_spent(("n1", "n2"), "node n2 was lost (killed)"))
    ... # doctest: +NORMALIZE_WHITESPACE
    abandoned after 2 attempts, each lost with its node (n1, n2; last: node n2 was
    lost (killed)): if the job itself kills nodes, fix it; otherwise raise
    max_attempts (now 2)
    """
    count = len(lost_on)
    return (
        f"abandoned after {count} attempt{'s' if count > 1 else ''}, each lost with "
        f"its node ({', '.join(lost_on)}; last: {last}): if the job itself kills "
        f"nodes, fix it; otherwise raise max_attempts (now {count})"
    )


@dataclass(slots=True)
class _Job:
    """A tracked job: queued (``node`` is None) or running on ``node``."""

    key: int
    pin: str | None
    attempt: int = 1
    node: str | None = None
    cancel_requested: bool = False  # asked to terminate it
    unstarted_cancel: bool = False  # asked to drop it if it has not started
    # Nodes lost while running this job, one per attempt that died with its node.
    lost_on: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Node:
    """A present node; ``running`` maps key to attempt, in dispatch order."""

    name: str
    cpus: int
    order: int
    mean_duration: float | None = None
    window: int = 0
    running: dict[int, int] = field(default_factory=dict)

    def load(self) -> policy.NodeLoad:
        return policy.NodeLoad(
            self.name, self.cpus, len(self.running), self.window, self.order
        )


class SchedulerState:
    """Decide which job runs where, and which results count.

    Feed every event to `handle` and carry out the instructions it returns, in order.
    After each event the state dispatches as many queued jobs as the nodes have room
    for (see `policy.window`), serving a node's pinned jobs before the shared queue and
    balancing the rest with `policy.assign`.

    Parameters
    ----------
    reentrant
        Whether a job whose node leaves may run again elsewhere. If True, such a job
        (unless pinned or being cancelled) is queued again, at the front, with a new
        attempt number; otherwise it is abandoned.
    max_attempts
        How many attempts of one job may die with their node before the job is
        abandoned instead of resubmitted (a poison job would otherwise take down
        node after node). Attempts handed back unstarted (`JobReturned`) do not count.

    Raises
    ------
    ValueError
        If ``max_attempts`` is less than 1.

    Notes
    -----
    Job keys must be unique for the lifetime of the state (a counter will do): a key
    still tracked raises `ValueError`, but a finished key cannot be told apart from a
    new one. Events about unknown keys or nodes are ignored. Results are matched on
    ``(key, attempt, node)``, so a result from an old attempt, or from a node that no
    longer runs the job, yields no `AcceptResult`: each job completes exactly once.

    Examples
    --------
    >>> state = SchedulerState()
    >>> state.handle(JobSubmitted(1))
    []
    >>> state.handle(NodeJoined("n1", cpus=1))
    [SendJobs(node='n1', jobs=((1, 1),))]
    >>> state.handle(JobFinished("n1", 1, attempt=1, duration=0.5))
    [AcceptResult(key=1, attempt=1)]
    """

    def __init__(self, reentrant: bool = False, max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        self._reentrant: bool = reentrant
        self._max_attempts: int = max_attempts
        self._jobs: dict[int, _Job] = {}
        self._queue: _Queue = OrderedDict()
        # Pinned jobs by node; only non-empty queues are kept.
        self._pinned: dict[str, _Queue] = {}
        # Present nodes, in join order.
        self._nodes: dict[str, _Node] = {}
        # Names of present nodes with room for one more job.
        self._open: set[str] = set()
        #: Nodes with room in their window (due a refill or not).
        self._room: set[str] = set()
        self._caps: dict[str, int] = {}  # node -> most jobs it may hold (limit_window)
        self._joins: int = 0
        self._running: int = 0

    # -- queries ----------------------------------------------------------------------

    @property
    def reentrant(self) -> bool:
        """Whether jobs of a lost node are resubmitted elsewhere."""
        return self._reentrant

    @property
    def max_attempts(self) -> int:
        """Attempts of a job that may die with their node before it is abandoned."""
        return self._max_attempts

    @property
    def queued_count(self) -> int:
        """Jobs waiting for a node, pinned ones included."""
        return len(self._queue) + sum(len(queue) for queue in self._pinned.values())

    @property
    def running_count(self) -> int:
        """Jobs sent to a node and not yet finished, over all nodes."""
        return self._running

    @property
    def nodes(self) -> tuple[NodeInfo, ...]:
        """Snapshots of the present nodes, in join order."""
        return tuple(
            NodeInfo(n.name, n.cpus, len(n.running), n.window, n.mean_duration)
            for n in self._nodes.values()
        )

    def node_running(self, node: str) -> int:
        """Return the number of jobs in flight on ``node`` (0 if it is not present)."""
        entry = self._nodes.get(node)
        return 0 if entry is None else len(entry.running)

    def is_known(self, key: int) -> bool:
        """Return whether job ``key`` is queued or running."""
        return key in self._jobs

    def running_keys(self, node: str) -> list[int]:
        """Keys of the jobs running on ``node``, in dispatch order."""
        info = self._nodes.get(node)
        return list(info.running) if info is not None else []

    def runs_on(self, key: int, node: str) -> bool:
        """Return whether job ``key`` (any attempt) is the one running on ``node``."""
        job = self._jobs.get(key)
        return job is not None and job.node == node

    def is_queued(self, key: int) -> bool:
        """Return whether job ``key`` is held here, not sent to any node."""
        job = self._jobs.get(key)
        return job is not None and job.node is None

    def returnable(self, key: int) -> bool:
        """Whether job ``key``, sent to a node, would go back to the queue if handed
        back: neither pinned to that node nor asked to be cancelled."""
        job = self._jobs.get(key)
        return (
            job is not None
            and job.node is not None
            and job.pin is None
            and not job.cancel_requested
            and not job.unstarted_cancel
        )

    def pinned_keys(self, node: str) -> list[int]:
        """Keys of the jobs queued for ``node`` only, in submission order."""
        return list(self._pinned.get(node, ()))

    def is_running(self, key: int, attempt: int, node: str) -> bool:
        """Return whether attempt ``attempt`` of job ``key`` is the one on ``node``."""
        job = self._jobs.get(key)
        return job is not None and job.node == node and job.attempt == attempt

    # -- the entry point --------------------------------------------------------------

    def handle(self, event: Event, *, dispatch: bool = True) -> list[Instruction]:
        """Apply one event and return the instructions it calls for.

        Instructions about the event itself come first, then at most one `SendJobs`
        per node, in join order.

        Parameters
        ----------
        event
            What happened.
        dispatch
            False: leave the `SendJobs` out; a later `dispatch` (once for a batch of
            events: the results of one message, the jobs of one drain) sends them.

        Returns
        -------
        list of Instruction
            What to do, in order. Often empty.

        Raises
        ------
        ValueError
            If a `JobSubmitted` key is already queued or running.
        TypeError
            If ``event`` is not an `Event`.
        """
        out: list[Instruction] = []
        match event:
            case JobSubmitted():
                self._submit(event)
            case NodeJoined():
                self._join(event)
            case NodeLeft():
                self._leave(event, out)
            case JobFinished():
                self._finish(event, out)
            case JobReturned():
                self._return(event, out)
            case CancelRequested():
                self._cancel(event, out)
            case _:
                raise TypeError(f"not a scheduler event: {event!r}")
        if dispatch:
            submitted = isinstance(event, JobSubmitted)
            self._dispatch(out, self._room if submitted else self._open)
        return out

    def dispatch(self, submitted: bool = False) -> list[Instruction]:
        """Send queued jobs to nodes with room: at most one `SendJobs` per node, in
        join order (after events handled with ``dispatch=False``).

        ``submitted``: the pass follows new submissions, which go to any node with
        room in its window, not only to nodes due a refill (`policy.wants_jobs`):
        jobs submitted one at a time reach the nodes as they come (where they
        survive a client that dies, for ``recover_jobs``) just as a burst does.
        """
        out: list[Instruction] = []
        self._dispatch(out, self._room if submitted else self._open)
        return out

    # -- event handlers ---------------------------------------------------------------

    def _submit(self, event: JobSubmitted) -> None:
        key = event.key
        if key in self._jobs:
            raise ValueError(f"job key {key} is already in use; keys must be unique")
        self._jobs[key] = _Job(key, event.node)
        if event.node is None:
            self._queue[key] = None
        else:
            self._pinned.setdefault(event.node, OrderedDict())[key] = None

    def _join(self, event: NodeJoined) -> None:
        node = self._nodes.get(event.node)
        if node is None:
            node = _Node(event.node, event.cpus, self._joins)
            self._nodes[event.node] = node
            self._joins += 1
        else:
            # Fewer CPUs than jobs in flight stops dispatching; nothing is taken back.
            node.cpus = event.cpus
        self._refresh(node)

    def _leave(self, event: NodeLeft, out: list[Instruction]) -> None:
        node = self._nodes.pop(event.node, None)
        if node is None:
            if not event.returning:  # (set up again, it failed: none will run them)
                self._strand(event.node, out)
            return
        self._open.discard(node.name)
        self._room.discard(node.name)
        self._running -= len(node.running)
        requeued: list[int] = []
        for key in node.running:
            job = self._jobs[key]
            movable = (
                self._reentrant
                and job.pin is None
                and not job.cancel_requested
                and not job.unstarted_cancel
            )
            job.lost_on.append(node.name)
            if movable and len(job.lost_on) >= self._max_attempts:
                # Retry budget spent: stop feeding a (maybe poison) job to nodes.
                del self._jobs[key]
                out.append(AbandonJob(key, node.name, tuple(job.lost_on)))
            elif movable:
                job.attempt += 1
                job.node = None
                requeued.append(key)
                out.append(ResubmitJob(key, job.attempt))
            else:
                del self._jobs[key]
                out.append(AbandonJob(key, node.name))
        # Requeued jobs go to the front, keeping their dispatch order.
        for key in reversed(requeued):
            self._queue[key] = None
            self._queue.move_to_end(key, last=False)
        if not event.returning:
            self._strand(node.name, out)

    def _strand(self, name: str, out: list[Instruction]) -> None:
        """Jobs queued for node ``name`` only are lost with it, as the ones it ran."""
        for key in self._pinned.pop(name, ()):
            del self._jobs[key]
            out.append(AbandonJob(key, name))

    def _return(self, event: JobReturned, out: list[Instruction]) -> None:
        """A job that never started comes back from its node: queue it at the front."""
        node = self._nodes.get(event.node)
        job = self._jobs.get(event.key)
        if node is None or job is None or node.running.get(event.key) != event.attempt:
            return  # stale
        del node.running[event.key]
        self._running -= 1
        self._refresh(node)
        if job.cancel_requested or job.unstarted_cancel:
            del self._jobs[event.key]
            out.append(CancelQueued(event.key))
            return
        if job.pin is not None:
            del self._jobs[event.key]
            out.append(AbandonJob(event.key, node.name))
            return
        job.attempt += 1
        job.node = None
        self._queue[event.key] = None
        self._queue.move_to_end(event.key, last=False)
        out.append(ResubmitJob(event.key, job.attempt))

    def _finish(self, event: JobFinished, out: list[Instruction]) -> None:
        key = event.key
        job = self._jobs.get(key)
        if job is None or job.node != event.node or job.attempt != event.attempt:
            logger.debug(
                "stale result of job %s attempt %s from node %s ignored",
                key,
                event.attempt,
                event.node,
            )
            return
        node = self._nodes[event.node]  # a running job's node is present
        del node.running[key]
        del self._jobs[key]
        self._running -= 1
        # A terminated (or dropped) job's run time says nothing.
        if not job.cancel_requested and not job.unstarted_cancel:
            node.mean_duration = policy.update_mean(node.mean_duration, event.duration)
        self._refresh(node)
        out.append(AcceptResult(key, event.attempt))

    def cancel_many(
        self, keys: Iterable[int], unstarted: bool = False
    ) -> list[Instruction]:
        """Cancel jobs together (a Stop of a whole run): as a `CancelRequested` per
        key, in order, but in one pass. The cancels of jobs on nodes come first,
        then one `DropQueued` of the queued jobs, then the jobs left in the queue
        are dispatched once, not after each cancel."""
        out: list[Instruction] = []
        dropped: list[int] = []
        jobs = self._jobs
        for key in keys:
            job = jobs.get(key)
            if job is None:
                continue
            if job.node is None:
                self._unqueue(job)
                del jobs[key]
                dropped.append(key)
            else:
                self._cancel_sent(job, unstarted, out)
        if dropped:
            out.append(DropQueued(tuple(dropped)))
        self._dispatch(out, self._open)
        return out

    def _cancel(self, event: CancelRequested, out: list[Instruction]) -> None:
        job = self._jobs.get(event.key)
        if job is None:
            return
        if job.node is None:
            self._unqueue(job)
            del self._jobs[job.key]
            out.append(CancelQueued(job.key))
        else:
            self._cancel_sent(job, event.unstarted, out)

    @staticmethod
    def _cancel_sent(job: _Job, unstarted: bool, out: list[Instruction]) -> None:
        """Ask the node that has ``job`` to cancel it (once)."""
        assert job.node is not None
        if job.cancel_requested:
            return  # asking twice sends nothing more
        if not unstarted:
            job.cancel_requested = True
            out.append(CancelRunning(job.node, job.key, job.attempt))
        elif not job.unstarted_cancel:
            job.unstarted_cancel = True
            out.append(CancelRunning(job.node, job.key, job.attempt, unstarted=True))

    # -- internals --------------------------------------------------------------------

    def _unqueue(self, job: _Job) -> None:
        """Remove a queued job from its queue."""
        if job.pin is None:
            del self._queue[job.key]
            return
        queue = self._pinned[job.pin]
        del queue[job.key]
        if not queue:
            del self._pinned[job.pin]

    def limit_window(self, node: str, cap: int | None) -> None:
        """Let ``node`` hold at most ``cap`` jobs (None: no limit but the policy's),
        from its next dispatch on; a node not joined yet gets it when it joins."""
        if cap is None:
            self._caps.pop(node, None)
        else:
            self._caps[node] = cap
        present = self._nodes.get(node)
        if present is not None:
            self._refresh(present)

    def _refresh(self, node: _Node) -> None:
        """Recompute a node's window and whether it has room."""
        node.window = policy.window(node.cpus, node.mean_duration)
        if self._caps and (cap := self._caps.get(node.name)) is not None:
            node.window = min(node.window, cap)
        if policy.wants_jobs(node.cpus, len(node.running), node.window):
            self._open.add(node.name)
        else:
            self._open.discard(node.name)
        if len(node.running) < node.window:
            self._room.add(node.name)
        else:
            self._room.discard(node.name)

    def _start(
        self, key: int, node: _Node, batches: dict[str, list[tuple[int, int]]]
    ) -> None:
        """Mark a job, just taken off its queue, as running on ``node``."""
        job = self._jobs[key]
        job.node = node.name
        node.running[key] = job.attempt
        self._running += 1
        batches.setdefault(node.name, []).append((key, job.attempt))

    def _dispatch(self, out: list[Instruction], open_nodes: set[str]) -> None:
        """Send queued jobs to ``open_nodes``: pinned jobs first, then shared ones."""
        if not open_nodes:
            return
        batches: dict[str, list[tuple[int, int]]] = {}
        for name in [name for name in self._pinned if name in open_nodes]:
            node = self._nodes[name]
            queue = self._pinned[name]
            while queue and len(node.running) < node.window:
                self._start(queue.popitem(last=False)[0], node, batches)
            if not queue:
                del self._pinned[name]
            self._refresh(node)
        if self._queue and open_nodes:
            loads = [self._nodes[name].load() for name in open_nodes]
            for name in policy.assign(loads, len(self._queue)):
                self._start(
                    self._queue.popitem(last=False)[0], self._nodes[name], batches
                )
            for load in loads:
                self._refresh(self._nodes[load.node])
        for name in sorted(batches, key=lambda name: self._nodes[name].order):
            out.append(SendJobs(name, tuple(batches[name])))
