"""Scheduler state machine: random event sequences checked against a model of its
invariants."""

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
    JobSubmitted,
    NodeJoined,
    NodeLeft,
    ResubmitJob,
    SchedulerState,
    SendJobs,
    policy,
)

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
