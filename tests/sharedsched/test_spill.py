"""`KeptMessages` past its quota: a result it cannot keep becomes an error that
names whom the results waited for and the option to raise."""

from __future__ import annotations

from pathlib import Path

from dispynb.protocol.messages import CRASHED, FINISHED, JobResults
from dispynb.protocol.records import ResultEntry
from schedserver.spill import KeptMessages, SpillStore


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
