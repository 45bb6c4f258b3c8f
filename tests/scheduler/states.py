"""Helpers for the scheduler state machine's tests: a state with nodes, and jobs
submitted to it."""

from __future__ import annotations

from dispynb.scheduler import Instruction, JobSubmitted, NodeJoined, SchedulerState

LONG = 1.0  # a job duration that keeps windows at MIN_JOBS_PER_CPU per CPU


def make_state(*nodes: tuple[str, int], reentrant: bool = False) -> SchedulerState:
    """A state machine with ``nodes`` (name, cpus) joined."""
    state = SchedulerState(reentrant=reentrant)
    for name, cpus in nodes:
        state.handle(NodeJoined(name, cpus))
    return state


def submit(
    state: SchedulerState, *keys: int, node: str | None = None
) -> list[Instruction]:
    """Submit jobs ``keys`` (pinned to ``node`` if given); the instructions."""
    out: list[Instruction] = []
    for key in keys:
        out += state.handle(JobSubmitted(key, node))
    return out
