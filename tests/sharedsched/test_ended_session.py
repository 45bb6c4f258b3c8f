"""A session the scheduler ended (its user revoked, or its client a zombie) waits
for its client to take why, then closes: a client that takes nothing (stopped for
good, cut off) does not keep it open, nor what waits for it, for
``--zombie_interval`` (an hour): a minute of pulses at most
(`schedserver.toclient.ENDING_PULSES`). Real scheduler; a raw client that reads
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster
from dispynb.protocol.messages import JobCancel
from dispynb.transport.connection import QUEUED_HIGH
from schedserver.toclient import ENDING_PULSES
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    scheduler_cli,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: --pulse_interval: the session waits `ENDING_PULSES` of them (6 s).
PULSE = 0.1


@pytest.fixture
def fast_scheduler(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler pulsing every `PULSE` s; --zombie_interval an hour, as ever."""
    sched = SchedulerProcess(
        tmp_path,
        nodes.node_specs(),
        nodes.secret,
        args=("--pulse_interval", str(PULSE)),
    )
    sched.start()
    try:
        yield sched
    finally:
        sched.stop()


async def _revoked_unread(
    sched: SchedulerProcess, credential: Path, users: Path
) -> None:
    """Bob's client sends requests answered until the scheduler reads no more of
    it, reading nothing; then bob is revoked; wait until his session closed."""
    conn = await raw_scheduler_session(sched.port, credential)
    try:
        conn.hold_reading(True)  # stopped: it takes nothing from now on
        for key in range(2 * QUEUED_HIGH):
            conn.write(JobCancel(comp_id=999, key=key, attempt=1))
            if key % 1000 == 999:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.flush(), 1.0)
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
    fast_scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """Before, it stayed open an hour (--zombie_interval), holding what its
    socket had not taken."""
    asyncio.run(_revoked_unread(fast_scheduler, users["bob"], tmp_path / "users"))
    disconnected = [
        line
        for line in fast_scheduler.log_text().splitlines()
        if "disconnected" in line
    ]
    assert len(disconnected) == 1 and "user 'bob'" in disconnected[0], disconnected
