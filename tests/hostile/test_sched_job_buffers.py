"""One user of a scheduler queues jobs of many empty buffers.

``--max_user_args`` bounds what one user's jobs hold in the scheduler's memory:
their arguments' bytes and `JOB_COST` per job. A message may carry 65,536 buffers;
each buffer the scheduler holds is an object of about 190 bytes, and an empty one
costs the client 4 bytes (its length). A job of 65,535 empty buffers thus held
12 MiB here, counted as 512 bytes: 256 KiB sent grew the scheduler by 12 MiB, and
the quota of 1 GiB let it grow by terabytes. Each buffer counts now.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from dispynb.protocol import serialize
from dispynb.protocol.framing import MAX_BUFFERS
from dispynb.protocol.messages import JobSubmit
from tests.hostile.test_scheduler import args_quota_attack, people
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    refusals_within,
    set_up_raw,
    submit_raw,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: Mallory's quota, the messages she sends (a job each, of `BUFFERS` buffers),
#: and what the scheduler may grow by meanwhile.
QUOTA = 16 * MiB
MESSAGES = 24
BUFFERS = MAX_BUFFERS - 1
BOUND = 96 * MiB
#: Seconds each step may take.
WAIT = 60


def nap(n: int) -> int:
    import time

    time.sleep(20)  # its CPU stays taken: the other jobs wait queued
    return n


async def _hoard(sched: SchedulerProcess, credential: Path) -> tuple[int, list[str]]:
    """Take every CPU with jobs that sleep, then queue `MESSAGES` jobs of
    `BUFFERS` buffers (the first their arguments, the others empty): the
    scheduler's growth, and the refusals."""
    assert sched.proc is not None
    scheduler = psutil.Process(sched.proc.pid)
    conn = await raw_scheduler_session(sched.port, credential)
    try:
        await set_up_raw(conn, nap, name="hoard", timeout=WAIT)
        submit_raw(conn, [(key,) for key in range(4)])
        await conn.flush()
        before = peak = scheduler.memory_info().rss
        empty = memoryview(b"")
        for key in range(4, 4 + MESSAGES):
            args = serialize.dumps(((key,), {}))
            job_buffers = [*args, *[empty] * (BUFFERS - len(args))]
            conn.write(JobSubmit(comp_id=1, jobs=[[key, 1, BUFFERS]]), job_buffers)
            await conn.flush()

        def watch() -> None:
            nonlocal peak
            peak = max(peak, scheduler.memory_info().rss)

        # Every job answered (queued: no word; refused: a result), or the
        # scheduler's memory settled.
        refusals = await refusals_within(conn, 5, MESSAGES, watch)
        return peak - before, refusals
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-job-buffers",
    title=f"A scheduler user queues {MESSAGES} jobs of {BUFFERS:,} buffers each, "
    f"all empty but the first (256 KiB sent each; --max_user_args "
    f"{QUOTA // MiB}M)",
    goal=f"the scheduler grows by under {BOUND // MiB} MiB, the jobs over her quota "
    "refused naming --max_user_args; another user's jobs run (was: 512 bytes "
    "counted a job, 12 MiB held: +315 MiB)",
)
def test_empty_buffers_count_in_the_users_args_quota(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    grown, refusals, alices = args_quota_attack(tmp_path, people, QUOTA, _hoard)
    measure(
        f"scheduler +{grown / MiB:.0f} MiB; {len(refusals)} of {MESSAGES} jobs "
        f"refused ({refusals[0][:80] if refusals else 'none'}...); alice's results "
        f"{alices}"
    )
    assert grown < BOUND
    assert refusals and all("--max_user_args" in text for text in refusals)
    assert alices == [0, 1, 4, 9]
