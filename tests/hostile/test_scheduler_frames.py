"""A user of a shared scheduler announces large frames and sends none of them.

After authentication a frame may be as large as the scheduler's message limit (1 GiB
by default); a frame too large for a read's chunk gets a buffer of its own when its
8-byte prefix arrives, and that buffer was a zero-filled bytearray: the scheduler
held (and wrote) the whole announced size before a byte of it came.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from dispynb.transport.connection import Connection
from tests.hostile.test_scheduler import alices_jobs_meanwhile, people, shared_nodes
from tests.hostile.tools import wait_for
from tests.sharedsched.harness import raw_scheduler_session

pytestmark = pytest.mark.slow

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: Sessions mallory opens, each announcing one frame of `ANNOUNCED` bytes.
SESSIONS = 3
ANNOUNCED = (1 << 30) - 64
#: The same with frames just small enough for a reusable body (`framing.SPARE_MAX`),
#: on nearly as many sessions as a user may open (`--max_sessions`, 32).
MID_SESSIONS = 30
MID_ANNOUNCED = (32 << 20) - 64


async def _announce(
    port: int, credential: Path, sessions: int, size: int
) -> list[Connection]:
    """Open ``sessions`` sessions; on each, send the prefix of a frame of ``size``
    bytes, and nothing more."""
    held = []
    for _ in range(sessions):
        conn = await raw_scheduler_session(port, credential, max_message_size=MiB)
        sock = conn._link._sock  # type: ignore[union-attr]  # the raw socket
        sock.send(struct.pack("!II", size, 1))
        held.append(conn)
    return held


def _announced_frames(
    tmp_path: Path,
    people: dict[str, Path],
    sessions: int,
    size: int,
    measure: Callable[[str], None],
) -> None:
    """Mallory announces her frames: the scheduler's RSS grows by under 64 MiB, and
    alice's jobs run meanwhile."""
    with shared_nodes(tmp_path, people) as sched:
        assert sched.proc is not None
        scheduler = psutil.Process(sched.proc.pid)
        before = scheduler.memory_info().rss

        async def attack() -> tuple[int, list[int] | str]:
            held = await _announce(sched.port, people["mallory"], sessions, size)
            try:
                # Every prefix read (each would take its buffer at once).
                wait_for(
                    lambda: (
                        sum(
                            1
                            for c in scheduler.net_connections("tcp")
                            if c.laddr.port == sched.port
                            and c.status == psutil.CONN_ESTABLISHED
                        )
                        >= sessions
                    ),
                    "mallory's sessions",
                )
                alices = await alices_jobs_meanwhile(sched.address, people["alice"])
                return scheduler.memory_info().rss, alices
            finally:
                for conn in held:
                    conn.close()

        during, alices = asyncio.run(attack())
    grown = (during - before) / MiB
    measure(
        f"scheduler RSS {before / MiB:.0f} -> {during / MiB:.0f} MiB "
        f"(+{grown:.0f} MiB) with {sessions} frames announced; alice's jobs: {alices}"
    )
    assert alices == [0, 1, 4, 9]
    assert grown < 64


@pytest.mark.attack(
    id="sched-announced-frames",
    title=f"A scheduler user opens {SESSIONS} sessions and sends on each the prefix "
    f"of a {ANNOUNCED >> 20} MiB frame, and nothing more",
    goal="scheduler RSS growth under 64 MiB; another user's jobs run meanwhile "
    "(was: +2,124 MiB for 3 prefixes, and the other user's connect timed out)",
)
@pytest.mark.timeout(120)
def test_announced_frames_take_no_memory(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    _announced_frames(tmp_path, people, SESSIONS, ANNOUNCED, measure)


@pytest.mark.attack(
    id="sched-announced-mid-frames",
    title=f"A scheduler user opens {MID_SESSIONS} sessions and sends on each the "
    "prefix of a frame just under 32 MiB (the largest kept for reuse), and nothing "
    "more",
    goal="scheduler RSS growth under 64 MiB; another user's jobs run meanwhile "
    "(was: +969 MiB, each prefix took a zero-filled buffer of the frame's size)",
)
@pytest.mark.timeout(120)
def test_announced_mid_size_frames_take_no_memory(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    _announced_frames(tmp_path, people, MID_SESSIONS, MID_ANNOUNCED, measure)
