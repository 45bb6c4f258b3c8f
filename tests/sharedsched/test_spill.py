"""`KeptMessages` past its quota: a result it cannot keep becomes an error that
names whom the results waited for and the option to raise."""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dispynb.protocol.messages import (
    CRASHED,
    FINISHED,
    ComputationSetup,
    JobResults,
    ResultsJournaled,
    WireMessage,
    pack_header,
    unpack_header,
)
from dispynb.protocol.records import ResultEntry
from schedserver.computation import SharedComputation
from schedserver.session import SchedulerSession
from schedserver.spill import (
    BUFFER_COST,
    ENTRY_COST,
    MESSAGE_COST,
    KeptMessages,
    SpillStore,
)

#: What a result of one buffer counts besides its bytes (`_result`'s).
COST = MESSAGE_COST + ENTRY_COST + BUFFER_COST


def over_quota_reason(tmp_path: Path, **whose: str) -> str:
    kept = KeptMessages(SpillStore(str(tmp_path), memory=1 << 20), "c", 16, **whose)
    entry = ResultEntry(1, 0, FINISHED, 1.0, 2.0, "", "", None, 1)
    kept.add(
        JobResults(comp_id=1, results=[entry.to_wire()], started=[]),
        [memoryview(b"x" * 64)],
    )
    message, buffers = kept.pop()
    assert isinstance(message, JobResults) and not buffers
    dropped, _ = ResultEntry.from_wire(message.results[0])
    assert dropped.outcome == CRASHED and dropped.exception is not None
    return dropped.exception


def test_a_result_over_the_quota_names_a_client_that_went_away(tmp_path: Path) -> None:
    reason = over_quota_reason(tmp_path)
    assert "for a client that went away (--max_kept)" in reason


def test_a_backlog_over_the_quota_names_a_client_that_does_not_read(
    tmp_path: Path,
) -> None:
    reason = over_quota_reason(tmp_path, whose="a client that does not read")
    assert "for a client that does not read (--max_kept)" in reason
    assert "went away" not in reason


def test_a_result_for_a_client_back_is_kept_whatever_the_quota(tmp_path: Path) -> None:
    """While a client that came back is sent what was kept (the replay), what
    ends meanwhile is kept behind it for that client: past the quota too. Was: a
    result that ended during the replay became the --max_kept error, though its
    client was there to take it (CI under load: a recovered job Terminated)."""
    kept = KeptMessages(SpillStore(str(tmp_path), memory=1 << 20), "c", 16)
    entry = ResultEntry(1, 0, FINISHED, 1.0, 2.0, "", "", None, 1)
    kept.add(
        JobResults(comp_id=1, results=[entry.to_wire()], started=[]),
        [memoryview(b"x" * 64)],
        within_quota=False,
    )
    message, buffers = kept.pop()
    assert isinstance(message, JobResults)
    result, _ = ResultEntry.from_wire(message.results[0])
    assert result.outcome == FINISHED and bytes(buffers[0]) == b"x" * 64
    assert not kept.full


def _result(kept: KeptMessages, key: int, size: int) -> None:
    entry = ResultEntry(key, 0, FINISHED, 1.0, 2.0, "", "", None, 1)
    kept.add(
        JobResults(comp_id=1, results=[entry.to_wire()], started=[]),
        [memoryview(b"x" * size)],
    )


def test_a_users_computations_and_backlogs_keep_her_quota_in_all(
    tmp_path: Path,
) -> None:
    """--max_user_kept: what one user's computations and backlogs keep counts
    together; past it her result is an error naming the option, and the one held
    for it gets CPUs again as soon as her other computation is collected. Another
    user's keep theirs."""
    quota = 4096 + 3 * COST // 2  # two results of hers, but not a third KiB
    store = SpillStore(str(tmp_path), memory=1 << 20, user_quota=quota)
    first = KeptMessages(store, "alice/a", 1 << 20, user="alice")
    backlog = KeptMessages(store, "alice", 1 << 20, whose="x", user="alice")
    bobs = KeptMessages(store, "bob/b", 1 << 20, user="bob")
    _result(first, 1, 2048)
    _result(backlog, 2, 1024)
    _result(bobs, 3, 3000)
    assert not (first.full or backlog.full or bobs.full)
    _result(backlog, 4, 1024)  # alice's fourth KiB: over, with the costs counted
    # (its error entry kept in its place: a few hundred bytes, not its KiB)
    assert backlog.full and store.user("alice").size < quota + 1024
    kept, dropped = backlog.pop(), backlog.pop()
    assert kept[1] and not dropped[1]
    entry, _ = ResultEntry.from_wire(dropped[0].results[0])  # type: ignore[attr-defined]
    assert entry.outcome == CRASHED and entry.exception is not None
    assert "for user 'alice' in all" in entry.exception
    assert "(--max_user_kept)" in entry.exception
    _result(first, 5, 2048)  # the backlog collected: 2 KiB of room, not more
    assert first.full  # held: alice has no room
    first.clear()  # (as the other computation collected or closed)
    assert store.user("alice").size == 0 and not first.full
    assert not bobs.full and store.user("bob").size == bobs.size


class _SlowReader:
    """A client connection whose socket holds ``unsent`` bytes it has not taken."""

    peer = "127.0.0.1:1"

    def __init__(self) -> None:
        self.unsent = 1 << 30
        self.written: list[Any] = []

    def write(self, message: Any, buffers: Any = ()) -> None:
        self.written.append(message)

    async def flush(self) -> None:
        self.unsent = 0


def test_a_backlog_over_its_users_quota_lets_her_jobs_run_once_sent(
    tmp_path: Path,
) -> None:
    """A client that did not read: its backlog went over --max_user_kept, which
    holds its computations' jobs. Once it read the backlog, the scheduler did not
    dispatch again (the hold had lifted as room came back, unseen): its queued jobs
    waited for some other event, for ever on a quiet scheduler."""
    store = SpillStore(str(tmp_path), memory=1 << 20, user_quota=4096)
    spawned: list[Any] = []
    schedules: list[int] = []
    server: Any = SimpleNamespace(
        config=SimpleNamespace(pulse_interval=1.0, max_kept=1 << 20),
        spill=store,
        _spawn=spawned.append,
        schedule=lambda: schedules.append(1),
    )
    conn = _SlowReader()

    async def main() -> None:
        session = SchedulerSession(conn, server, "alice")  # type: ignore[arg-type]
        session.check_backlog()
        backlog = session.backlog
        assert backlog is not None
        for key in range(3):
            _result(backlog, key, 2048)
        assert backlog.full  # held: past her quota
        (sending,) = spawned
        await sending
        assert session.backlog is None and len(conn.written) == 3
        assert schedules, "her jobs held by the backlog were never dispatched again"

    asyncio.run(main())


def test_room_acknowledged_in_her_quota_lets_her_held_computation_run(
    tmp_path: Path,
) -> None:
    """Alice's computation whose client went away is held over --max_user_kept,
    most of it taken by what her connected client's computation keeps for its
    journal. That client then acknowledged its results, freeing the room: the
    scheduler did not dispatch again (it did only for a computation that was held
    itself), and the held one's queued jobs waited for some other event, for ever
    on a quiet scheduler, though the README says it runs again once room is freed
    in her quota."""
    store = SpillStore(str(tmp_path), memory=1 << 20, user_quota=8192)
    schedules: list[int] = []

    async def main() -> None:
        server: Any = SimpleNamespace(
            config=SimpleNamespace(
                pulse_interval=1.0, max_queued=None, max_kept=1 << 20, max_user_args=0
            ),
            spill=store,
            schedule=lambda: schedules.append(1),
            schedule_soon=lambda: schedules.append(1),
        )
        session = SchedulerSession(_SlowReader(), server, "alice")  # type: ignore[arg-type]
        journaling = SharedComputation(
            server, session, ComputationSetup(comp_id=1, name="b", workers=0), [], 1
        )
        session.computations[1] = journaling
        journaling.kept.tracking = True
        away = SharedComputation(
            server, session, ComputationSetup(comp_id=2, name="a", workers=0), [], 2
        )
        away.session = None  # its client went away
        server.computations = [journaling, away]
        for key in range(3):
            _result(journaling.kept, key, 2048)
        _result(away.kept, 10, 1024)
        _result(away.kept, 11, 2048)  # over her quota: held
        assert away.held and not journaling.held
        session._on_journaled(
            ResultsJournaled(comp_id=1, jobs=[[k, 0] for k in range(3)])
        )
        assert not journaling.kept
        assert schedules, "her held computation was not given CPUs again"
        assert not away.held

    asyncio.run(main())


def test_a_backlog_given_room_again_is_not_said_of_a_client_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hold of --max_user_kept lifted on a connected client's backlog: the
    log said 'its jobs run again while its client is away' of a client that
    was there all along, only not reading."""
    store = SpillStore(str(tmp_path), memory=1 << 20, user_quota=4096 + COST)
    backlog = KeptMessages(
        store,
        "user 'alice'",
        1 << 20,
        whose="a client that does not read",
        user="alice",
    )
    for key in range(3):
        _result(backlog, key, 2048)
    assert backlog.full
    with caplog.at_level(logging.INFO, logger="schedserver"):
        backlog.pop()  # its client reads: room comes back in her quota
        assert not backlog.full and backlog  # (as a dispatch looks meanwhile)
    (said,) = [m for r in caplog.records if "room freed" in (m := r.getMessage())]
    assert "client is away" not in said, said
    assert said.endswith("(their results kept for a client that does not read)")


def _decoded(message: JobResults, buffers: int) -> tuple[Any, list[memoryview]]:
    """``message`` and ``buffers`` empty payload buffers as the scheduler reads them
    from a node: the header decoded, the buffers views of one frame's body."""
    body = memoryview(bytearray(4 * buffers + 64))
    header = pack_header(message.to_header())
    decoded = WireMessage.from_header(unpack_header(header, trusted=True))
    return decoded, [body[i:i] for i in range(buffers)]


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("shape", ["buffers", "results", "starts"])
def test_what_is_kept_counts_the_memory_it_holds(
    tmp_path: Path, shape: str, on_disk: bool
) -> None:
    """A node's message (it holds the secret) of 65,535 empty buffers, 20,000
    results without payload or 20,000 job starts, acknowledged by its client one
    job at a time: what it counts against --kept_memory and the quotas is at least
    the memory it holds, in memory and while on disk (was: 12 MiB of views counted
    as 256 bytes; 5.4 MB of results as 1.3 MB; what waits for acknowledgements as
    nothing)."""
    many = 20_000
    if shape == "buffers":
        entry = ResultEntry(1, 0, FINISHED, 1.0, 2.0, "", "", None, 65_535)
        message, count = JobResults(comp_id=1, results=[entry.to_wire()]), 65_535
    elif shape == "results":
        entries = [
            ResultEntry(key, 0, FINISHED, 1.0, 2.0, "", "", None, 0).to_wire()
            for key in range(many)
        ]
        message, count = JobResults(comp_id=1, results=entries), 0
    else:
        starts: list[list[Any]] = [[key, 0, 1.5, 0] for key in range(many)]
        message, count = JobResults(comp_id=1, results=[], started=starts), 0
    store = SpillStore(str(tmp_path), memory=0 if on_disk else 1 << 30)
    kept = KeptMessages(store, "c", 1 << 30)
    kept.tracking = True
    try:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept.add(*_decoded(message, count))
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert (kept.on_disk > 0) == on_disk
        assert kept.size >= held, f"{kept.size} bytes counted, {held} held"
    finally:
        kept.clear()
        store.close()
