"""Scheduler events (what happened) and instructions (what to do next), as plain data.

Contents:

- events, fed to :meth:`dispynb.scheduler.state.SchedulerState.handle`:
  `JobSubmitted`, `NodeJoined`, `NodeLeft`, `JobFinished`, `CancelRequested`;
- instructions, returned by it: `SendJobs`, `AcceptResult`, `CancelQueued`,
  `DropQueued`, `CancelRunning`, `AbandonJob`, `ResubmitJob`;
- `Event` and `Instruction`, the unions of the two families.

A job is identified by an int ``key`` that the client assigns and never reuses; a node
by a str ``node`` id. Every dispatch of a job is an *attempt*, numbered from 1: results
are matched on ``(key, attempt, node)`` so that a late result of an old attempt is
never taken for the current one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "AbandonJob",
    "AcceptResult",
    "CancelQueued",
    "CancelRequested",
    "CancelRunning",
    "DropQueued",
    "Event",
    "Instruction",
    "JobFinished",
    "JobSubmitted",
    "NodeJoined",
    "NodeLeft",
    "ResubmitJob",
    "SendJobs",
]


# -- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobSubmitted:
    """A new job; ``node`` pins it to that node only.

    A pinned job waits until its node is present and is never moved to another node.
    """

    key: int
    node: str | None = None


@dataclass(frozen=True, slots=True)
class NodeJoined:
    """A node is ready for this computation, or its CPU count changed.

    Raises
    ------
    ValueError
        If ``cpus`` is negative.
    """

    node: str
    cpus: int

    def __post_init__(self) -> None:
        if self.cpus < 0:
            raise ValueError(f"node {self.node!r}: cpus must be >= 0, not {self.cpus}")


@dataclass(frozen=True, slots=True)
class NodeLeft:
    """The node's connection was lost, or the node was removed.

    ``returning``: it is being set up again (``resetup_node``, or ``allocate_node``
    as its ``close_node`` went on): the jobs queued for it alone wait for it.
    """

    node: str
    returning: bool = False


@dataclass(frozen=True, slots=True)
class JobFinished:
    """A final result for attempt ``attempt`` of job ``key`` arrived from ``node``.

    ``duration`` is the job's run time on the node, in seconds. A job terminated on
    request (after `CancelRunning`) is reported with this event too.
    """

    node: str
    key: int
    attempt: int
    duration: float


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """The user asked to cancel job ``key``.

    ``unstarted``: only if it has not started (`concurrent.futures` semantics): a
    job already on a node is cancelled there only if it waits, a running one goes
    on. Otherwise a running job is terminated (dispy's ``cluster.cancel``).
    """

    key: int
    unstarted: bool = False


@dataclass(frozen=True, slots=True)
class JobReturned:
    """``node`` hands back attempt ``attempt`` of job ``key`` without having started it
    (the node is shutting down). The job runs elsewhere, reentrant or not."""

    node: str
    key: int
    attempt: int


Event: TypeAlias = (
    JobSubmitted | NodeJoined | NodeLeft | JobFinished | JobReturned | CancelRequested
)


# -- instructions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendJobs:
    """Send these ``(key, attempt)`` pairs to ``node``, in this order, in one batch.

    `SchedulerState.handle` returns at most one `SendJobs` per node.
    """

    node: str
    jobs: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class AcceptResult:
    """The result just reported for ``(key, attempt)`` is current: complete the job.

    The job is forgotten by the state. If a cancel had been requested, this is the
    node's report that the job was terminated (or finished before it could be).
    """

    key: int
    attempt: int


@dataclass(frozen=True, slots=True)
class CancelQueued:
    """The job was still queued and has been dropped: mark it cancelled."""

    key: int


@dataclass(frozen=True, slots=True)
class DropQueued:
    """Jobs still queued have been dropped together (`SchedulerState.cancel_many`:
    a Stop of a whole run): mark them cancelled, in this order."""

    keys: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CancelRunning:
    """Ask ``node`` to terminate attempt ``attempt`` of job ``key`` (with
    ``unstarted``: to drop it only if it has not started there).

    The job stays running in the state until its `JobFinished` arrives or its node
    leaves (then it is abandoned, never resubmitted).
    """

    node: str
    key: int
    attempt: int
    unstarted: bool = False


@dataclass(frozen=True, slots=True)
class AbandonJob:
    """``node`` left and job ``key`` cannot be moved elsewhere: fail it.

    This happens when the state is not reentrant, when the job is pinned to that node
    (running or still queued for it), when a cancel was requested, or when the job has
    used up its attempts: then ``lost_on`` names the node of every attempt that died
    with its node, in order (the job may be what kills them). The job is forgotten by
    the state.
    """

    key: int
    node: str
    lost_on: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResubmitJob:
    """The node running job ``key`` left; the job is queued again as ``attempt``.

    Informational: the job goes to the front of the queue, and a `SendJobs` returned by
    the same `handle` call carries it if a node has room.
    """

    key: int
    attempt: int


Instruction: TypeAlias = (
    SendJobs
    | AcceptResult
    | CancelQueued
    | DropQueued
    | CancelRunning
    | AbandonJob
    | ResubmitJob
)
