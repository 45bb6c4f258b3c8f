"""Scheduler state machine: each job's result accepted exactly once."""

from __future__ import annotations

from dispynb.scheduler import (
    AcceptResult,
    JobFinished,
    NodeJoined,
    NodeLeft,
    ResubmitJob,
    SendJobs,
)
from tests.scheduler.states import LONG, make_state, submit


def test_finish_unknown_key_no_accept():
    state = make_state(("a", 1))
    assert state.handle(JobFinished("a", 99, 1, LONG)) == []
    assert state.handle(JobFinished("ghost", 99, 1, LONG)) == []


def test_finish_wrong_node_no_accept():
    state = make_state(("a", 1), ("b", 1))
    submit(state, 1)  # on a
    assert state.handle(JobFinished("b", 1, 1, LONG)) == []
    assert state.is_known(1)
    assert state.node_running("a") == 1
    assert state.handle(JobFinished("a", 1, 1, LONG)) == [AcceptResult(1, 1)]


def test_finish_duplicate_result_accepted_once():
    state = make_state(("a", 1))
    submit(state, 1)
    assert state.handle(JobFinished("a", 1, 1, LONG)) == [AcceptResult(1, 1)]
    assert state.handle(JobFinished("a", 1, 1, LONG)) == []


def test_finish_queued_job_no_accept():
    state = make_state(("a", 1))
    submit(state, 1, 2, 3)  # 3 is queued, never sent
    assert state.handle(JobFinished("a", 3, 1, LONG)) == []
    assert state.queued_count == 1


def test_finish_old_attempt_after_resubmit_no_accept():
    state = make_state(("a", 1), ("b", 1), reentrant=True)
    submit(state, 1)  # on a
    assert state.handle(NodeLeft("a")) == [
        ResubmitJob(1, 2),
        SendJobs("b", ((1, 2),)),
    ]
    assert state.handle(JobFinished("a", 1, 1, LONG)) == []
    assert state.handle(JobFinished("b", 1, 1, LONG)) == []
    assert state.handle(JobFinished("b", 1, 2, LONG)) == [AcceptResult(1, 2)]


def test_finish_rejoined_node_old_attempt_no_accept():
    """A node that leaves and comes back under the same id is a new node."""
    state = make_state(("a", 1), reentrant=True)
    submit(state, 1)
    assert state.handle(NodeLeft("a")) == [ResubmitJob(1, 2)]
    assert state.handle(NodeJoined("a", 1)) == [SendJobs("a", ((1, 2),))]
    assert state.handle(JobFinished("a", 1, 1, LONG)) == []
    assert state.handle(JobFinished("a", 1, 2, LONG)) == [AcceptResult(1, 2)]
