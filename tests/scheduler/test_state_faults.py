"""Scheduler state machine: nodes leaving, jobs handed back, and the retry budget
(max_attempts)."""

from __future__ import annotations

import pytest

from dispynb.scheduler import (
    AbandonJob,
    AcceptResult,
    CancelQueued,
    CancelRequested,
    JobFinished,
    JobReturned,
    JobSubmitted,
    NodeJoined,
    NodeLeft,
    ResubmitJob,
    SchedulerState,
    SendJobs,
)
from dispynb.scheduler.state import attempts_spent
from tests.scheduler.states import LONG, make_state, submit

# -- nodes leaving ------------------------------------------------------------------


def test_node_left_reentrant_resubmits_at_front_and_dispatches():
    state = make_state(("a", 2), reentrant=True)  # window 4
    submit(state, 1, 2, 3, 4, 5)
    assert state.handle(NodeJoined("b", 1)) == [SendJobs("b", ((5, 1),))]
    assert state.handle(NodeJoined("c", 1)) == []
    assert submit(state, 6) == [SendJobs("c", ((6, 1),))]

    # b and c hold one job per CPU each: c, then b (equal load, joined first), then
    # c again; the resubmitted job 4 stays at the front, ahead of job 7.
    assert submit(state, 7) == [SendJobs("b", ((7, 1),))]
    assert state.handle(NodeLeft("a")) == [
        ResubmitJob(1, 2),
        ResubmitJob(2, 2),
        ResubmitJob(3, 2),
        ResubmitJob(4, 2),
        SendJobs("c", ((1, 2),)),
    ]
    assert state.queued_count == 3
    assert state.handle(JobFinished("b", 5, 1, LONG)) == [
        AcceptResult(5, 1),
        SendJobs("b", ((2, 2),)),
    ]


def test_node_left_reentrant_spreads_requeued_jobs_in_one_batch_per_node():
    state = make_state(("a", 2), reentrant=True)  # window 4
    submit(state, 1, 2, 3, 4, 5)
    state.handle(NodeJoined("b", 1))  # takes job 5
    state.handle(NodeJoined("c", 1))
    assert state.handle(NodeLeft("a")) == [
        ResubmitJob(1, 2),
        ResubmitJob(2, 2),
        ResubmitJob(3, 2),
        ResubmitJob(4, 2),
        SendJobs("b", ((2, 2),)),
        SendJobs("c", ((1, 2), (3, 2))),
    ]
    assert state.queued_count == 1
    assert submit(state, 6) == []
    assert state.handle(JobFinished("b", 5, 1, LONG)) == [
        AcceptResult(5, 1),
        SendJobs("b", ((4, 2),)),
    ]


def test_node_left_not_reentrant_abandons_running_jobs():
    state = make_state(("a", 1))
    submit(state, 1, 2, 3)
    assert state.handle(NodeLeft("a")) == [AbandonJob(1, "a"), AbandonJob(2, "a")]
    assert not state.is_known(1)
    assert not state.is_known(2)
    assert state.queued_count == 1
    assert state.running_count == 0
    assert state.nodes == ()
    assert state.handle(NodeJoined("b", 1)) == [SendJobs("b", ((3, 1),))]


# -- the retry budget (max_attempts) ------------------------------------------------


def test_poison_job_is_abandoned_after_max_attempts_naming_its_nodes():
    state = SchedulerState(reentrant=True, max_attempts=3)
    assert state.max_attempts == 3
    state.handle(NodeJoined("a", 1))
    submit(state, 1)
    assert state.handle(NodeLeft("a")) == [ResubmitJob(1, 2)]
    assert state.handle(NodeJoined("b", 1)) == [SendJobs("b", ((1, 2),))]
    assert state.handle(NodeLeft("b")) == [ResubmitJob(1, 3)]
    assert state.handle(NodeJoined("c", 1)) == [SendJobs("c", ((1, 3),))]
    assert state.handle(NodeLeft("c")) == [AbandonJob(1, "c", ("a", "b", "c"))]
    assert not state.is_known(1)
    # Nodes that come back get other work; the poison job stays gone.
    submit(state, 2)
    assert state.handle(NodeJoined("a", 1)) == [SendJobs("a", ((2, 1),))]


def test_retry_budget_is_per_job_and_other_jobs_are_unaffected():
    state = SchedulerState(reentrant=True, max_attempts=2)
    state.handle(NodeJoined("a", 1))
    submit(state, 1)  # 1 dies with a, then with b; 2 goes only with b
    state.handle(NodeLeft("a"))
    state.handle(NodeJoined("b", 1))
    submit(state, 2)
    assert state.running_keys("b") == [1, 2]
    assert state.handle(NodeLeft("b")) == [
        AbandonJob(1, "b", ("a", "b")),
        ResubmitJob(2, 2),
    ]
    assert state.handle(NodeJoined("c", 1)) == [SendJobs("c", ((2, 2),))]
    assert state.handle(JobFinished("c", 2, 2, LONG)) == [AcceptResult(2, 2)]


def test_returned_attempts_do_not_count_against_the_budget():
    state = SchedulerState(reentrant=True, max_attempts=1)
    state.handle(NodeJoined("a", 1))
    submit(state, 1)
    state.handle(NodeJoined("a", 0))  # it shuts down and hands the job back
    assert state.handle(JobReturned("a", 1, 1)) == [ResubmitJob(1, 2)]
    state.handle(NodeJoined("b", 1))
    assert state.handle(NodeLeft("b")) == [AbandonJob(1, "b", ("b",))]


def test_not_reentrant_and_pinned_abandon_without_budget_details():
    state = SchedulerState(reentrant=True, max_attempts=1)
    state.handle(NodeJoined("a", 1))
    state.handle(JobSubmitted(1, node="a"))
    assert state.handle(NodeLeft("a")) == [AbandonJob(1, "a")]
    state = SchedulerState(reentrant=False, max_attempts=1)
    state.handle(NodeJoined("a", 1))
    submit(state, 1)
    assert state.handle(NodeLeft("a")) == [AbandonJob(1, "a")]


@pytest.mark.parametrize("bad", [0, -1])
def test_max_attempts_below_one_is_refused(bad):
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        SchedulerState(reentrant=True, max_attempts=bad)


def test_attempts_spent_names_nodes_and_the_option():
    text = attempts_spent(("n1", "n2", "n3"), "node n3 was lost (connection closed)")
    assert "abandoned after 3 attempts" in text
    assert "(n1, n2, n3; last: node n3 was lost (connection closed))" in text
    assert "raise max_attempts (now 3)" in text


def test_job_returned_not_reentrant_runs_elsewhere_with_new_attempt():
    state = make_state(("a", 1), ("b", 1))
    submit(state, 1)
    node = "a" if state.node_running("a") else "b"
    other = "b" if node == "a" else "a"
    state.handle(NodeJoined(node, 0))  # it shuts down: no new jobs
    out = state.handle(JobReturned(node, 1, 1))
    assert out == [ResubmitJob(1, 2), SendJobs(other, ((1, 2),))]
    # The old attempt is stale now, from either node.
    assert state.handle(JobFinished(node, 1, 1, 0.1)) == []
    assert state.handle(JobFinished(other, 1, 2, 0.1)) == [AcceptResult(1, 2)]


def test_job_returned_stale_or_cancelled_or_pinned():
    state = make_state(("a", 1))
    submit(state, 1)
    assert state.handle(JobReturned("a", 1, 7)) == []  # not the running attempt
    state.handle(CancelRequested(1))
    assert state.handle(JobReturned("a", 1, 1)) == [CancelQueued(1)]
    state.handle(JobSubmitted(2, node="a"))
    assert state.handle(JobReturned("a", 2, 1)) == [AbandonJob(2, "a")]


def test_node_left_cancelled_running_job_is_abandoned_not_resubmitted():
    state = make_state(("a", 1), ("b", 1), reentrant=True)
    submit(state, 1, 2)  # 1 on a, 2 on b
    state.handle(CancelRequested(1))
    assert state.handle(NodeLeft("a")) == [AbandonJob(1, "a")]
    assert not state.is_known(1)
    assert state.node_running("b") == 1


def test_node_left_unknown_node_is_ignored():
    state = make_state(("a", 1))
    assert state.handle(NodeLeft("zz")) == []
    assert state.node_running("zz") == 0
