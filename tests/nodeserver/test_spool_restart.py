"""What a node started again finds in its kept-results spool: files it never wrote,
and computations its killed process was running."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from nodeserver.keeper import ResultKeeper
from nodeserver.spool import ResultSpool
from tests.nodeserver.test_spool import RID, FakeComputation, result


def test_files_no_node_names_so_are_neither_counted_nor_kept_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A job (the node's user) put files in a spool: the restarted node counted
    them as kept results, in its log and against --kept-results-size, until a
    client's claim checked them (an hour, if none came)."""
    spool = ResultSpool(str(tmp_path), 1 << 20)
    directory = spool.create(RID, "comp")
    assert spool.write(directory, *result(1))
    planted = Path(directory.path) / "r-planted"
    planted.write_bytes(b"x" * 100_000)
    with caplog.at_level(logging.INFO):
        again = ResultSpool(str(tmp_path), 1 << 20)
        [found] = again.load().values()
    assert len(found.files) == 1 and again.used == found.size
    assert not planted.exists()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 file in kept results" in line for line in warned), warned


def test_a_computation_its_killed_node_ran_is_said_cut_short_across_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Its node process was killed (no expiry written): the next says so in its log
    (it said "0 kept results offered to its client"), and so does one started
    after it, once that one stopped cleanly (it had written the expiry)."""

    async def main() -> None:
        killed = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        killed.register(RID, FakeComputation())  # type: ignore[arg-type]
        # SIGKILL: nothing more of it runs.
        for _ in range(2):
            restarted = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
            assert restarted.load() == 1
            spool = restarted.kept(RID).spool  # type: ignore[union-attr]
            assert spool is not None and spool.cut_short
            await restarted.close()

    with caplog.at_level(logging.INFO, logger="nodeserver.keeper"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "computation comp" in r.message]
    assert len(lines) == 2, lines
    for line in lines:
        assert line.startswith(
            "computation comp (its node was killed while it ran): no result kept; "
            "its client's recover_jobs is told until "
        ), line


def test_a_result_spooled_past_the_hundred_millionth_is_still_offered_after_a_restart(
    tmp_path: Path,
):
    """A node that spooled over 10**8 results (days of small jobs) names the next
    with a 9-digit sequence number: its restart took that result for a file it
    never wrote, and deleted it."""
    spool = ResultSpool(str(tmp_path), 1 << 20)
    directory = spool.create(RID, "comp")
    spool._seq = 10**8 - 1
    assert spool.write(directory, *result(1))
    assert spool.write(directory, *result(2))
    again = ResultSpool(str(tmp_path), 1 << 20)
    [found] = again.load().values()
    assert len(found.files) == 2, found.files
