"""A session the scheduler ended (its user revoked, or its client a zombie) waits
for its client to take why, then closes: a client that takes nothing (stopped for
good, cut off) does not keep it open, nor what waits for it, for
``--zombie_interval`` (an hour): a minute of pulses at most
(`schedserver.toclient.ENDING_PULSES`). Real scheduler; a raw client that reads
nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from schedserver.toclient import ENDING_PULSES
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    scheduler_cli,
    unread_answers,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: --pulse_interval: the session waits `ENDING_PULSES` of them (6 s).
PULSE = 0.1


@pytest.fixture
def scheduler_args() -> tuple[str, ...]:
    """The `scheduler` fixture's: a pulse every `PULSE` s; --zombie_interval an
    hour, as ever."""
    return ("--pulse_interval", str(PULSE))


async def _revoked_unread(
    sched: SchedulerProcess, credential: Path, users: Path
) -> None:
    """Bob's client sends requests answered until the scheduler reads no more of
    it, reading nothing; then bob is revoked; wait until his session closed."""
    conn = await raw_scheduler_session(sched.port, credential)
    try:
        conn.hold_reading(True)  # stopped: it takes nothing from now on
        await unread_answers(conn)
        done = await asyncio.to_thread(
            scheduler_cli, "user", "revoke", "bob", "--users", str(users)
        )
        assert done.returncode == 0, done.stderr
        await asyncio.to_thread(sched.wait_for_log, "was revoked: ending its session")
        grace = ENDING_PULSES * PULSE
        await asyncio.to_thread(sched.wait_for_log, "disconnected", timeout=grace + 20)
    finally:
        conn.close()


def test_a_revoked_session_whose_client_reads_nothing_closes_within_its_grace(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """Before, it stayed open an hour (--zombie_interval), holding what its
    socket had not taken."""
    asyncio.run(_revoked_unread(scheduler, users["bob"], tmp_path / "users"))
    disconnected = [
        line for line in scheduler.log_text().splitlines() if "disconnected" in line
    ]
    assert len(disconnected) == 1 and "user 'bob'" in disconnected[0], disconnected
