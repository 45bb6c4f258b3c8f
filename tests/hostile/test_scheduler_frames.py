"""A user of a shared scheduler announces large frames and sends none of them.

After authentication a frame may be as large as the scheduler's message limit (1 GiB
by default); a frame too large for a read's chunk gets a buffer of its own when its
8-byte prefix arrives, and that buffer was a zero-filled bytearray: the scheduler
held (and wrote) the whole announced size before a byte of it came.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import psutil
import pytest

from dispynb.secret import read_secret_file
from dispynb.transport.connection import Connection
from dispynb.transport.connector import connect
from tests.hostile.test_scheduler import _alices_jobs, people, shared_nodes
from tests.hostile.tools import wait_for

pytestmark = pytest.mark.slow

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: Sessions mallory opens, each announcing one frame of `ANNOUNCED` bytes.
SESSIONS = 3
ANNOUNCED = (1 << 30) - 64


async def _announce(port: int, credential: Path) -> list[Connection]:
    """Open `SESSIONS` sessions; on each, send the prefix of a frame of
    `ANNOUNCED` bytes, and nothing more."""
    held = []
    for _ in range(SESSIONS):
        conn, _ = await connect(
            "127.0.0.1", port, secret=read_secret_file(credential), max_message_size=MiB
        )
        sock = conn._link._sock  # type: ignore[union-attr]  # the raw socket
        sock.send(struct.pack("!II", ANNOUNCED, 1))
        held.append(conn)
    return held


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
    with shared_nodes(tmp_path, people) as sched:
        assert sched.proc is not None
        scheduler = psutil.Process(sched.proc.pid)
        before = scheduler.memory_info().rss

        async def attack() -> tuple[int, list[int] | str]:
            held = await _announce(sched.port, people["mallory"])
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
                        >= SESSIONS
                    ),
                    "mallory's sessions",
                )
                try:
                    alices: list[int] | str = await asyncio.wait_for(
                        asyncio.to_thread(_alices_jobs, sched.address, people["alice"]),
                        60,
                    )
                except Exception as exc:  # what alice meets
                    alices = f"{type(exc).__name__}: {exc}"[:200]
                return scheduler.memory_info().rss, alices
            finally:
                for conn in held:
                    conn.close()

        during, alices = asyncio.run(attack())
    grown = (during - before) / MiB
    measure(
        f"scheduler RSS {before / MiB:.0f} -> {during / MiB:.0f} MiB "
        f"(+{grown:.0f} MiB) with {SESSIONS} frames announced; alice's jobs: {alices}"
    )
    assert alices == [0, 1, 4, 9]
    assert grown < 64
