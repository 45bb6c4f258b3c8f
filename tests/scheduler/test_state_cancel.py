"""Scheduler state machine: cancelling queued, held, sent and running jobs."""

from __future__ import annotations

from dispynb.scheduler import (
    AbandonJob,
    AcceptResult,
    CancelQueued,
    CancelRequested,
    CancelRunning,
    DropQueued,
    JobFinished,
    JobReturned,
    NodeInfo,
    NodeJoined,
    NodeLeft,
    SchedulerState,
    SendJobs,
)
from tests.scheduler.states import LONG, make_state, submit


def test_cancel_queued_job_drops_it():
    state = make_state(("a", 1))
    submit(state, 1, 2, 3, 4)
    assert state.handle(CancelRequested(3)) == [CancelQueued(3)]
    assert not state.is_known(3)
    assert state.queued_count == 1
    assert state.handle(JobFinished("a", 1, 1, LONG)) == [
        AcceptResult(1, 1),
        SendJobs("a", ((4, 1),)),
    ]


def test_cancel_queued_pinned_job_drops_it():
    state = SchedulerState()
    submit(state, 1, node="b")
    assert state.handle(CancelRequested(1)) == [CancelQueued(1)]
    assert state.handle(NodeJoined("b", 1)) == []
    assert state.queued_count == 0


def test_cancel_running_job_asks_node_then_accepts_report():
    state = make_state(("a", 1))
    submit(state, 1)
    assert state.handle(CancelRequested(1)) == [CancelRunning("a", 1, 1)]
    assert state.handle(CancelRequested(1)) == []  # asked once only
    assert state.is_known(1)
    assert state.running_count == 1

    assert state.handle(JobFinished("a", 1, 1, 0.0001)) == [AcceptResult(1, 1)]
    assert not state.is_known(1)
    # A terminated job's run time does not feed the mean.
    assert state.nodes == (NodeInfo("a", 1, 0, 2, None),)


def test_cancel_unstarted_drops_a_held_job_and_asks_the_node_for_a_sent_one():
    """``job.cancel()`` (concurrent.futures): a job the client holds is dropped at
    once; one sent ahead to a node is dropped there only if it has not started."""
    state = make_state(("a", 1))
    submit(state, 1, 2, 3)  # window 2: 1 and 2 on the node, 3 held here
    assert state.is_queued(3) and not state.is_queued(2)
    assert state.handle(CancelRequested(3, unstarted=True)) == [CancelQueued(3)]
    assert state.handle(CancelRequested(2, unstarted=True)) == [
        CancelRunning("a", 2, 1, unstarted=True)
    ]
    assert state.handle(CancelRequested(2, unstarted=True)) == []  # asked once
    # dispy's cluster.cancel afterwards still terminates it (it had started).
    assert state.handle(CancelRequested(2)) == [CancelRunning("a", 2, 1)]
    assert state.handle(CancelRequested(2)) == []
    assert state.handle(CancelRequested(2, unstarted=True)) == []


def test_unstarted_cancel_of_a_job_handed_back_or_on_a_lost_node_cancels_it():
    state = make_state(("a", 1), reentrant=True)
    submit(state, 1, 2)
    state.handle(CancelRequested(1, unstarted=True))
    state.handle(CancelRequested(2, unstarted=True))
    # Handed back unstarted (the node shuts down): it is not run elsewhere.
    assert state.handle(JobReturned("a", 2, 1)) == [CancelQueued(2)]
    # Its node lost: it may have started; it is not run again either.
    assert state.handle(NodeLeft("a")) == [AbandonJob(1, "a")]


def test_cancel_unknown_key_is_ignored():
    state = make_state(("a", 1))
    assert state.handle(CancelRequested(42)) == []


def test_cancel_many_asks_the_nodes_then_drops_the_queued_jobs_together():
    """A Stop's bulk cancel: the jobs on nodes are asked to stop, in the order
    given, the queued ones (pinned or not) dropped in one `DropQueued`, and
    unknown keys ignored; the queue left is dispatched once."""
    state = make_state(("a", 1))
    submit(state, 1, 2, 3, 4)
    submit(state, 5, node="b")
    assert state.node_running("a") == 2  # 1 runs, 2 was sent ahead
    assert state.cancel_many([5, 4, 2, 1, 99]) == [
        CancelRunning("a", 2, 1),
        CancelRunning("a", 1, 1),
        DropQueued((5, 4)),
    ]
    assert state.queued_count == 1  # 3, not cancelled, still waits
    assert state.cancel_many([1]) == []  # asked once only
    assert state.handle(JobFinished("a", 1, 1, LONG)) == [
        AcceptResult(1, 1),
        SendJobs("a", ((3, 1),)),
    ]
