"""Tests of the scheduler state machine: exact instruction lists for given events."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from dispynb.scheduler import (
    AbandonJob,
    AcceptResult,
    CancelQueued,
    CancelRequested,
    CancelRunning,
    Event,
    Instruction,
    JobFinished,
    JobReturned,
    JobSubmitted,
    NodeInfo,
    NodeJoined,
    NodeLeft,
    ResubmitJob,
    SchedulerState,
    SendJobs,
    policy,
)
from dispynb.scheduler.state import attempts_spent

LONG = 1.0  # a job duration that keeps windows at MIN_JOBS_PER_CPU per CPU


def make_state(*nodes: tuple[str, int], reentrant: bool = False) -> SchedulerState:
    state = SchedulerState(reentrant=reentrant)
    for name, cpus in nodes:
        state.handle(NodeJoined(name, cpus))
    return state


def submit(state: SchedulerState, *keys: int, node: str | None = None) -> list:
    out: list[Instruction] = []
    for key in keys:
        out += state.handle(JobSubmitted(key, node))
    return out


# -- submitting and dispatching -----------------------------------------------------


def test_submit_before_any_node_queues_then_sends_one_batch():
    state = SchedulerState()
    assert submit(state, 1, 2, 3) == []
    assert state.queued_count == 3
    assert state.running_count == 0

    assert state.handle(NodeJoined("a", 2)) == [SendJobs("a", ((1, 1), (2, 1), (3, 1)))]
    assert state.queued_count == 0
    assert state.running_count == 3
    assert state.node_running("a") == 3


def test_submit_node_present_sends_at_once():
    state = make_state(("a", 1))
    assert state.handle(JobSubmitted(7)) == [SendJobs("a", ((7, 1),))]
    assert state.is_known(7)


def test_jobs_submitted_one_at_a_time_fill_the_window_refills_wait_for_a_quarter():
    state = make_state(("a", 4))  # window 8: refilled once 2 are free
    window = policy.window(4, None)
    sent = submit(state, *range(window))
    assert [job for send in sent for job in send.jobs] == [
        (k, 1) for k in range(window)
    ]
    assert submit(state, window) == []  # full: it waits
    # A result frees one slot: not worth a message yet (one job per result).
    assert state.handle(JobFinished("a", 0, 1, LONG)) == [AcceptResult(0, 1)]
    # A new submission goes to any room there is, where it survives its client.
    assert submit(state, window + 1) == [SendJobs("a", ((window, 1),))]
    assert submit(state, window + 2) == []  # full again
    state.handle(JobFinished("a", 1, 1, LONG))
    assert state.handle(JobFinished("a", 2, 1, LONG)) == [
        AcceptResult(2, 1),
        SendJobs("a", ((window + 1, 1), (window + 2, 1))),
    ]


def test_queue_order_is_fifo():
    state = make_state(("a", 1))  # window 2
    assert submit(state, 1, 2) == [SendJobs("a", ((1, 1),)), SendJobs("a", ((2, 1),))]
    assert submit(state, 3, 4, 5) == []

    assert state.handle(JobFinished("a", 2, 1, LONG)) == [
        AcceptResult(2, 1),
        SendJobs("a", ((3, 1),)),
    ]
    assert state.handle(JobFinished("a", 1, 1, LONG)) == [
        AcceptResult(1, 1),
        SendJobs("a", ((4, 1),)),
    ]
    assert state.handle(JobFinished("a", 3, 1, LONG)) == [
        AcceptResult(3, 1),
        SendJobs("a", ((5, 1),)),
    ]


def test_balance_two_nodes_different_cpus_fewest_per_cpu_wins():
    state = make_state(("a", 1), ("b", 3))  # windows 2 and 6
    chosen = [state.handle(JobSubmitted(key))[0].node for key in range(8)]
    assert chosen == ["a", "b", "b", "b", "a", "b", "b", "b"]
    assert state.handle(JobSubmitted(8)) == []
    assert (state.node_running("a"), state.node_running("b")) == (2, 6)


def test_balance_equal_load_first_joined_wins():
    state = make_state(("b", 2), ("a", 2))
    assert submit(state, 1, 2, 3) == [
        SendJobs("b", ((1, 1),)),
        SendJobs("a", ((2, 1),)),
        SendJobs("b", ((3, 1),)),
    ]


def test_window_full_node_keeps_jobs_queued():
    state = make_state(("a", 2))  # window 4
    out = submit(state, 1, 2, 3, 4, 5, 6)
    assert out == [SendJobs("a", ((key, 1),)) for key in (1, 2, 3, 4)]
    assert state.node_running("a") == 4
    assert state.queued_count == 2
    assert state.nodes == (NodeInfo("a", 2, 4, 4, None),)


def test_window_short_jobs_grows_and_fills_pipeline():
    state = make_state(("a", 1))
    submit(state, *range(1, 11))
    assert state.running_count == 2

    # Mean 1 ms: depth ceil(5 ms / 1 ms) + 1 = 6, so five more jobs go in one batch.
    assert state.handle(JobFinished("a", 1, 1, 0.001)) == [
        AcceptResult(1, 1),
        SendJobs("a", ((3, 1), (4, 1), (5, 1), (6, 1), (7, 1))),
    ]
    assert state.nodes == (NodeInfo("a", 1, 6, 6, 0.001),)


def test_window_jobs_get_longer_shrinks_without_recall():
    state = make_state(("a", 1))
    submit(state, *range(1, 9))
    state.handle(JobFinished("a", 1, 1, 0.001))  # window 6, 6 running
    assert state.handle(JobFinished("a", 2, 1, 10.0)) == [AcceptResult(2, 1)]
    (info,) = state.nodes
    assert info.window == 2
    assert info.running == 5
    assert state.queued_count == 1


def test_finish_frees_slot_dispatches_next():
    state = make_state(("a", 1))
    submit(state, 1, 2, 3)
    assert state.handle(JobFinished("a", 1, 1, LONG)) == [
        AcceptResult(1, 1),
        SendJobs("a", ((3, 1),)),
    ]
    assert not state.is_known(1)
    assert state.running_count == 2
    assert state.queued_count == 0


def test_deferred_dispatch_sends_a_batch_once_per_node_in_queue_order():
    # The driver handles a message's results (and a drain's jobs) without dispatching
    # after each one, then dispatches once: the same jobs leave, in queue order.
    eager = make_state(("a", 1), ("b", 2))
    deferred = make_state(("a", 1), ("b", 2))
    sent_eager = submit(eager, *range(1, 9))
    for key in range(1, 9):
        assert deferred.handle(JobSubmitted(key, None), dispatch=False) == []
    assert deferred.running_count == 0
    sent = deferred.dispatch()
    assert [i.node for i in sent] == ["a", "b"]  # one batch per node, join order
    keys = sorted(k for i in sent for k, _attempt in i.jobs)
    assert keys == sorted(k for i in sent_eager for k, _attempt in i.jobs)
    assert deferred.running_count == eager.running_count
    # Results handled alike free their slots; one dispatch refills them.
    running = [k for i in sent for k, _attempt in i.jobs]
    first = next(i for i in sent if i.node == "a").jobs[0][0]
    out = deferred.handle(JobFinished("a", first, 1, LONG), dispatch=False)
    assert out == [AcceptResult(first, 1)]
    refill = deferred.dispatch()
    assert [i.node for i in refill] == ["a"]
    assert refill[0].jobs[0][0] == min(set(range(1, 9)) - set(running))
    assert deferred.dispatch() == []  # nothing left with room: nothing sent


def test_node_joined_again_updates_cpus():
    state = make_state(("a", 1))
    submit(state, 1, 2, 3, 4, 5)

    assert state.handle(NodeJoined("a", 2)) == [SendJobs("a", ((3, 1), (4, 1)))]
    assert state.nodes == (NodeInfo("a", 2, 4, 4, None),)

    # Fewer CPUs: nothing is recalled, but nothing is sent until below the window.
    assert state.handle(NodeJoined("a", 1)) == []
    assert state.handle(JobFinished("a", 1, 1, LONG)) == [AcceptResult(1, 1)]
    assert state.handle(JobFinished("a", 2, 1, LONG)) == [AcceptResult(2, 1)]
    assert state.handle(JobFinished("a", 3, 1, LONG)) == [
        AcceptResult(3, 1),
        SendJobs("a", ((5, 1),)),
    ]


def test_node_joined_zero_cpus_gets_no_jobs():
    state = make_state(("a", 0))
    assert submit(state, 1) == []
    assert submit(state, 2, node="a") == []
    assert state.queued_count == 2
    assert state.handle(NodeJoined("a", 1)) == [SendJobs("a", ((2, 1), (1, 1)))]


def test_node_joined_negative_cpus_raises():
    with pytest.raises(ValueError, match="cpus"):
        NodeJoined("a", -1)


# -- results: exactly once ----------------------------------------------------------


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


# -- cancelling ---------------------------------------------------------------------


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


# -- pinned jobs --------------------------------------------------------------------


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


# -- programming errors -------------------------------------------------------------


def test_submit_duplicate_key_raises():
    state = make_state(("a", 1))
    submit(state, 1, 2, 3)
    for key in (1, 3):  # running, queued
        with pytest.raises(ValueError, match="already in use"):
            state.handle(JobSubmitted(key))
    with pytest.raises(ValueError, match="already in use"):
        state.handle(JobSubmitted(3, node="a"))
    assert state.running_count == 2
    assert state.queued_count == 1


def test_handle_not_an_event_raises():
    with pytest.raises(TypeError, match="not a scheduler event"):
        SchedulerState().handle(AcceptResult(1, 1))  # type: ignore[arg-type]


# -- random sequences ---------------------------------------------------------------

NODE_NAMES = ("a", "b", "c", "d")
DURATIONS = (0.0001, 0.001, 0.01, 1.0)


@dataclass
class Model:
    """What the instructions say happened, checked step by step against the state."""

    reentrant: bool
    max_attempts: int = 3
    lost: dict[int, list[str]] = field(default_factory=dict)
    pins: dict[int, str | None] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    queued: set[int] = field(default_factory=set)
    running: dict[int, tuple[str, int]] = field(default_factory=dict)
    cancelling: set[int] = field(default_factory=set)
    accepted: set[int] = field(default_factory=set)
    cancelled: set[int] = field(default_factory=set)
    abandoned: set[int] = field(default_factory=set)
    results: list[JobFinished] = field(default_factory=list)
    present: set[str] = field(default_factory=set)
    # Queue order: the shared queue, and each node's pinned queue.
    order: dict[str | None, list[int]] = field(default_factory=dict)
    resubmitted: list[int] = field(default_factory=list)
    sent: dict[str | None, list[int]] = field(default_factory=dict)

    def live(self) -> set[int]:
        return self.queued | set(self.running)

    def apply(self, event: Event, out: list[Instruction]) -> None:
        if isinstance(event, JobSubmitted):
            self.pins[event.key] = event.node
            self.attempts[event.key] = 1
            self.queued.add(event.key)
            self.order.setdefault(event.node, []).append(event.key)
        expected_accept = isinstance(event, JobFinished) and self.running.get(
            event.key
        ) == (event.node, event.attempt)
        for instruction in out:
            self.apply_instruction(event, instruction)
        self.check_order()
        if expected_accept:
            assert AcceptResult(event.key, event.attempt) in out
        if isinstance(event, NodeJoined):
            self.present.add(event.node)
        if isinstance(event, NodeLeft):
            assert all(node != event.node for node, _ in self.running.values())
            if event.node in self.present:  # else its pinned jobs keep waiting
                assert all(self.pins[key] != event.node for key in self.queued)
            self.present.discard(event.node)

    def check_order(self) -> None:
        """Check that each queue sent a prefix of itself; resubmitted jobs lead."""
        self.order.setdefault(None, [])[:0] = self.resubmitted
        self.resubmitted.clear()
        for pin, keys in self.sent.items():
            queue = self.order[pin]
            assert sorted(keys) == sorted(queue[: len(keys)])
            del queue[: len(keys)]
        self.sent.clear()

    def apply_instruction(self, event: Event, instruction: Instruction) -> None:
        match instruction:
            case SendJobs(node, jobs):
                pins = [self.pins[key] for key, _ in jobs]
                assert pins == sorted(pins, key=lambda pin: pin is None)  # pins first
                for key, attempt in jobs:
                    assert key in self.queued
                    assert self.pins[key] in (None, node)
                    assert attempt == self.attempts[key]
                    self.queued.remove(key)
                    self.running[key] = (node, attempt)
                    self.sent.setdefault(self.pins[key], []).append(key)
            case AcceptResult(key, attempt):
                assert isinstance(event, JobFinished)
                assert (event.key, event.attempt) == (key, attempt)
                assert self.running.pop(key) == (event.node, attempt)
                assert key not in self.accepted
                self.accepted.add(key)
                self.cancelling.discard(key)
                self.results.append(event)
            case CancelQueued(key):
                assert event == CancelRequested(key)
                self.queued.remove(key)
                self.order[self.pins[key]].remove(key)
                self.cancelled.add(key)
            case CancelRunning(node, key, attempt):
                assert event == CancelRequested(key)
                assert self.running[key] == (node, attempt)
                assert key not in self.cancelling
                self.cancelling.add(key)
            case AbandonJob(key, node, lost_on):
                assert event == NodeLeft(node)
                if key in self.running:
                    assert self.running.pop(key)[0] == node
                    lost = self.lost.setdefault(key, [])
                    lost.append(node)
                    movable = (
                        self.reentrant
                        and self.pins[key] is None
                        and key not in self.cancelling
                    )
                    if movable:  # only for a spent retry budget
                        assert len(lost) == self.max_attempts
                        assert lost_on == tuple(lost)
                    else:
                        assert lost_on == ()
                else:
                    assert lost_on == ()
                    assert self.pins[key] == node
                    self.queued.remove(key)
                    self.order[node].remove(key)
                self.cancelling.discard(key)
                self.abandoned.add(key)
            case ResubmitJob(key, attempt):
                assert isinstance(event, NodeLeft)
                assert self.reentrant
                assert self.pins[key] is None
                assert key not in self.cancelling
                assert self.running.pop(key)[0] == event.node
                self.lost.setdefault(key, []).append(event.node)
                assert len(self.lost[key]) < self.max_attempts
                assert attempt == self.attempts[key] + 1
                self.attempts[key] = attempt
                self.queued.add(key)
                self.resubmitted.append(key)
            case _:
                raise AssertionError(f"unexpected instruction {instruction!r}")


def check_state(state: SchedulerState, model: Model, before: dict[str, int]) -> None:
    """Compare the state with the model and check the scheduling invariants."""
    assert state.queued_count == len(model.queued)
    assert state.running_count == len(model.running)
    # Every tracked key is in exactly one place: a queue or one node.
    places = list(state._queue)
    for queue in state._pinned.values():
        assert queue
        places += queue
    for node in state._nodes.values():
        places += node.running
    assert sorted(places) == sorted(model.live())
    assert sorted(state._jobs) == sorted(model.live())
    for key in model.live():
        assert state.is_known(key)
    for info in state.nodes:
        on_node = [key for key, (node, _) in model.running.items() if node == info.node]
        assert info.running == state.node_running(info.node) == len(on_node)
        # No node is pushed over its window (a shrinking window recalls nothing).
        assert info.running <= max(info.window, before.get(info.node, 0))
        # Work-conserving: a node that wants jobs (a quarter of its window free, or
        # about to run dry) has nothing queued that it could take.
        if policy.wants_jobs(info.cpus, info.running, info.window):
            assert all(model.pins[key] not in (None, info.node) for key in model.queued)


def random_event(rng: random.Random, model: Model, next_key: int) -> Event:
    roll = rng.random()
    if roll < 0.36:
        pin = rng.choice(NODE_NAMES) if rng.random() < 0.15 else None
        return JobSubmitted(next_key, pin)
    if roll < 0.60 and model.running:
        key = rng.choice(sorted(model.running))
        node, attempt = model.running[key]
        return JobFinished(node, key, attempt, rng.choice(DURATIONS))
    if roll < 0.68:
        return NodeJoined(rng.choice(NODE_NAMES), rng.randint(0, 2))
    if roll < 0.73:
        return NodeLeft(rng.choice(NODE_NAMES))
    if roll < 0.83:
        live = sorted(model.live())
        if live and rng.random() < 0.8:
            return CancelRequested(rng.choice(live))
        return CancelRequested(rng.randrange(next_key + 2))
    # A result that must be ignored: repeated, old attempt, wrong node, unknown key.
    if model.results and rng.random() < 0.4:
        return rng.choice(model.results)
    if model.running and rng.random() < 0.6:
        key = rng.choice(sorted(model.running))
        node, attempt = model.running[key]
        if attempt > 1 and rng.random() < 0.7:
            return JobFinished(node, key, attempt - 1, 0.001)
        other = rng.choice([name for name in NODE_NAMES if name != node])
        return JobFinished(other, key, attempt, 0.001)
    return JobFinished(rng.choice(NODE_NAMES), 10**6 + next_key, 1, 0.001)


def step(state: SchedulerState, model: Model, event: Event) -> list[Instruction]:
    before = {info.node: info.running for info in state.nodes}
    out = state.handle(event)
    senders = [i.node for i in out if isinstance(i, SendJobs)]
    assert len(senders) == len(set(senders))  # one batch per node
    model.apply(event, out)
    check_state(state, model, before)
    return out


@pytest.mark.parametrize(
    ("reentrant", "max_attempts"), [(False, 3), (True, 3), (True, 1), (True, 1000)]
)
@pytest.mark.parametrize("seed", range(6))
def test_random_events_keep_invariants(seed, reentrant, max_attempts):
    rng = random.Random(seed)
    state = SchedulerState(reentrant=reentrant, max_attempts=max_attempts)
    model = Model(reentrant, max_attempts)
    next_key = 0
    for _ in range(1000):
        if model.live() and rng.random() < 0.02:
            with pytest.raises(ValueError):
                state.handle(JobSubmitted(rng.choice(sorted(model.live()))))
            continue
        event = random_event(rng, model, next_key)
        if isinstance(event, JobSubmitted):
            next_key += 1
        step(state, model, event)

    # Drain: every node present with CPUs, then finish whatever runs.
    for name in NODE_NAMES:
        step(state, model, NodeJoined(name, 2))
    while model.running:
        key = min(model.running)
        node, attempt = model.running[key]
        step(state, model, JobFinished(node, key, attempt, 0.001))

    assert not model.queued
    assert state.queued_count == state.running_count == 0
    ends = [model.accepted, model.cancelled, model.abandoned]
    assert sum(len(end) for end in ends) == next_key  # each key ended exactly once
    assert set().union(*ends) == set(range(next_key))
    assert model.accepted  # the sequence did exercise results
