"""Scheduler state machine: submitting jobs and dispatching them to nodes' windows
(exact instruction lists for given events), and programming errors refused."""

from __future__ import annotations

import pytest

from dispynb.scheduler import (
    AcceptResult,
    JobFinished,
    JobSubmitted,
    NodeInfo,
    NodeJoined,
    SchedulerState,
    SendJobs,
    policy,
)
from tests.scheduler.states import LONG, make_state, submit

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
