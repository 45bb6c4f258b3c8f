"""One user of a scheduler floods requests from sessions that do not read.

A session whose client does not take its results gets a backlog (on disk past
``--kept_memory``): what follows for the client waits there, its results within
``--max_user_kept`` for its user in all. The answers to the client's requests (a
refusal each) went there too, whatever that quota: the scheduler read the
client's requests until the session's own backlog held ``--max_kept`` (1 GiB),
so one user with ``--max_sessions`` (32) sessions could have 32 GiB of refusals
counted (half as much on its disk). It reads no more of her sessions with a
backlog once her quota is used up now: her requests wait in her own sockets.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from dispynb.protocol.messages import (
    JobCancel,
)
from dispynb.transport.connection import Connection
from tests.hostile.test_scheduler import alices_jobs_meanwhile, people, shared_nodes
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    set_up_raw,
    submit_raw,
)
from tests.tcpstate import flushed_or_held

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: Mallory's sessions, the jobs of each and their results (more than what her
#: socket, her client's read-ahead and the scheduler's 32 MiB unsent take).
SESSIONS = 2
JOBS = 40
RESULT = 2 * MiB
#: What she reads of each session's results before she floods it.
READ = 20 * MiB
#: What she may keep in all, and each session's backlog (--max_kept).
USER_QUOTA = 4 * MiB
SESSION_QUOTA = 32 * MiB
#: Requests sent per session at most (each batch sent, or held by the scheduler
#: reading no more of her: `flushed_or_held`).
REQUESTS = 400_000
#: Seconds each step may take.
WAIT = 60


def two_mib(n: int) -> bytes:
    return bytes([n % 256]) * (2 << 20)


def spill_bytes(pid: int) -> int:
    """Disk blocks (bytes) of the scheduler's spill files (unlinked: only its
    descriptors reach them)."""
    total = 0
    fds = f"/proc/{pid}/fd"
    for name in os.listdir(fds):
        try:
            if "/spill-" in os.readlink(f"{fds}/{name}"):
                total += os.stat(f"{fds}/{name}").st_blocks * 512
        except OSError:
            pass  # closed meanwhile
    return total


async def _backlogged(sched: SchedulerProcess, credential: Path) -> Connection:
    """A session of mallory's whose results wait in a backlog: she read none
    (her quota fills with them), then a few, so that the scheduler reads her
    requests again."""
    conn = await raw_scheduler_session(sched.port, credential, max_message_size=1 << 30)
    await set_up_raw(conn, two_mib, name="flood", timeout=WAIT)
    submit_raw(conn, [(i,) for i in range(JOBS)])
    await conn.flush()
    return conn


async def _flood(conn: Connection) -> tuple[int, bool]:
    """Requests the scheduler refuses, without reading, until it takes no more:
    how many were sent, and whether it stopped taking them."""
    sent = 0
    while sent < REQUESTS:
        for _ in range(1000):
            conn.write(JobCancel(comp_id=999, key=sent, attempt=1))
            sent += 1
        if not await flushed_or_held(conn, WAIT):
            return sent, True
    return sent, False


async def _attack(sched: SchedulerProcess, people: dict[str, Path]) -> tuple:
    assert sched.proc is not None
    conns = []
    try:
        for _ in range(SESSIONS):
            conns.append(await _backlogged(sched, people["mallory"]))
        await asyncio.to_thread(
            sched.wait_for_log, "(--max_user_kept); its queued jobs", timeout=WAIT
        )
        deadline = time.monotonic() + WAIT
        while sched.log_text().count("does not read what is sent") < SESSIONS:
            assert time.monotonic() < deadline, "no backlog for each session"
            await asyncio.sleep(0.1)
        for conn in conns:  # some results read: below the scheduler's read hold
            taken = 0
            while taken < READ:
                _message, buffers = await asyncio.wait_for(conn.recv(), WAIT)
                taken += sum(b.nbytes for b in buffers)
        floods = await asyncio.gather(*(_flood(conn) for conn in conns))
        disk = spill_bytes(sched.proc.pid)
        alices = await alices_jobs_meanwhile(sched.address, people["alice"])
        return floods, disk, alices
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.attack(
    id="sched-user-backlog-flood",
    title=f"A scheduler user does not read the results of {SESSIONS} sessions, "
    f"then floods each with up to {REQUESTS:,} refused requests (--max_user_kept "
    f"{USER_QUOTA // MiB}M, --max_kept {SESSION_QUOTA // MiB}M)",
    goal="the scheduler reads no more of her once her quota is used: its spill "
    "files hold under her quota and 1 MiB; another user's jobs run (was: "
    "--max_kept of refusals per session, 23 MiB on disk here)",
)
def test_one_users_unread_answers_stay_within_her_quota(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(
        tmp_path, people,
        "--max_user_kept", f"{USER_QUOTA // MiB}M",
        "--max_kept", f"{SESSION_QUOTA // MiB}M",
        "--kept_memory", "0",  # all on disk
        "--dest_path_prefix", str(tmp_path / "spill"),
    ) as sched:  # fmt: skip
        floods, disk, alices = asyncio.run(_attack(sched, people))
    measure(
        f"requests taken before the scheduler stopped reading: "
        f"{', '.join(f'{sent:,} (stopped: {stuck})' for sent, stuck in floods)}; "
        f"spill files {disk / MiB:.1f} MiB on disk; alice's results {alices}"
    )
    assert all(stuck for _sent, stuck in floods)
    assert disk < USER_QUOTA + MiB
    assert alices == [0, 1, 4, 9]
