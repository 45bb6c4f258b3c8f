"""`only_own` and `all_own`: a scheduler passes on what a node says about its own
jobs only (the attack: tests/hostile/test_sched_foreign_results.py)."""

from __future__ import annotations

from dispynb.protocol.messages import JobResults, pack_header
from schedserver.nodeclaims import all_own, only_own


def _entry(key: int, buffers: int, streamed: bool = False) -> list[object]:
    entry: list[object] = [key, 1, "finished", 1.0, 2.0, "", "", None, buffers]
    return [*entry, True] if streamed else entry


MINE = {1, 3, 4}


def runs_here(key: int, attempt: int) -> bool:
    return key in MINE and attempt == 1


def test_only_the_nodes_own_results_and_starts_are_kept_with_their_buffers():
    message = JobResults(
        comp_id=7,
        results=[_entry(1, 2), _entry(2, 1), _entry(3, 0, streamed=True), _entry(4, 1)],
        started=[[1, 1, 1.0, 0], [2, 1, 1.0, 0], [4, 2, 1.0, 0], "garbage"],
    )
    buffers = [memoryview(b) for b in (b"1a", b"1b", b"2", b"4")]
    kept, kept_buffers, foreign = only_own(message, buffers, runs_here)
    assert [item[0] for item in kept.results] == [1, 3, 4]
    assert [bytes(b) for b in kept_buffers] == [b"1a", b"1b", b"4"]
    assert kept.started == [[1, 1, 1.0, 0]]
    assert foreign == 4  # job 2's result and start, attempt 2 of 4, the garbage
    assert not all_own(pack_header(message.to_header()), runs_here)


def test_a_message_of_its_own_jobs_is_left_as_it_is():
    message = JobResults(comp_id=7, results=[_entry(1, 1)], started=[[3, 1, 1.0, 1]])
    buffers = [memoryview(b"x")]
    assert only_own(message, buffers, runs_here) == (message, buffers, 0)
    assert all_own(pack_header(message.to_header()), runs_here)
