"""Scheduler state machine: jobs pinned to one node."""

from __future__ import annotations

from dispynb.scheduler import (
    AbandonJob,
    AcceptResult,
    JobFinished,
    NodeJoined,
    NodeLeft,
    SchedulerState,
    SendJobs,
)
from tests.scheduler.states import LONG, make_state, submit


def test_pinned_job_waits_for_its_node():
    state = make_state(("a", 1))
    assert submit(state, 1, node="b") == []
    assert submit(state, 2) == [SendJobs("a", ((2, 1),))]
    assert state.queued_count == 1
    assert state.handle(NodeJoined("b", 1)) == [SendJobs("b", ((1, 1),))]


def test_pinned_job_at_head_does_not_block_shared_queue():
    state = SchedulerState()
    submit(state, 1, node="b")
    submit(state, 2, 3)
    assert state.handle(NodeJoined("a", 1)) == [SendJobs("a", ((2, 1), (3, 1)))]
    assert state.queued_count == 1


def test_pinned_queue_served_before_shared_queue():
    state = make_state(("a", 1))
    submit(state, 1, 2, 3)  # 3 queued in the shared queue
    assert submit(state, 4, node="a") == []
    assert state.handle(JobFinished("a", 1, 1, LONG)) == [
        AcceptResult(1, 1),
        SendJobs("a", ((4, 1),)),
    ]
    assert state.handle(JobFinished("a", 2, 1, LONG)) == [
        AcceptResult(2, 1),
        SendJobs("a", ((3, 1),)),
    ]


def test_pinned_and_shared_jobs_go_in_one_batch():
    state = SchedulerState()
    submit(state, 1, 2)
    submit(state, 3, node="a")
    assert state.handle(NodeJoined("a", 2)) == [SendJobs("a", ((3, 1), (1, 1), (2, 1)))]


def test_pinned_jobs_node_left_reentrant_abandons_not_moves():
    state = make_state(("a", 1), ("b", 1), reentrant=True)
    submit(state, 1, 2, 3, node="a")  # 1 and 2 run, 3 waits
    assert state.handle(NodeLeft("a")) == [
        AbandonJob(1, "a"),
        AbandonJob(2, "a"),
        AbandonJob(3, "a"),
    ]
    assert state.queued_count == 0
    assert state.node_running("b") == 0
