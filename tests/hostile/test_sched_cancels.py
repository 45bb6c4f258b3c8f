"""A user of a shared scheduler cancels jobs it does not have queued.

The scheduler looked for a cancelled job through its computation's whole queue,
in Python: with 200,000 of her jobs queued (none runs: her cluster decides its
nodes, `allocates`, and never does), 3,000 cancels of keys not queued held its
loop for seconds, and another user's client could not finish its handshake.
Queued jobs are now found by key (`schedserver.jobqueue`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ComputationReady,
    ComputationSetup,
    JobCancel,
    JobSubmit,
)
from tests.hostile.test_scheduler import alices_jobs_meanwhile, people, shared_nodes
from tests.sharedsched.harness import SchedulerProcess, raw_scheduler_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

__all__ = ["people"]  # the fixture

QUEUED = 200_000
CANCELS = 3_000
#: Seconds the other user's four jobs may take meanwhile, and the CPU seconds
#: the scheduler may spend on the cancels.
ALICE_WAIT = 5.0
CPU_BOUND = 1.0


def identity(n: int) -> int:
    return n


async def _attack(sched: SchedulerProcess, people: dict[str, Path]) -> tuple:
    assert sched.proc is not None
    scheduler = psutil.Process(sched.proc.pid)
    conn = await raw_scheduler_session(sched.port, people["mallory"])
    try:
        bundle = serialize.dumps({"func": identity, "setup": None, "setup_args": ()})
        setup = ComputationSetup(comp_id=1, name="m", workers=1, allocates=True)
        conn.write(setup, bundle)
        async with asyncio.timeout(30):
            while not isinstance((await conn.recv())[0], ComputationReady):
                pass
        argument = serialize.dumps(((1,), {}))
        per = 20_000
        for start in range(0, QUEUED, per):
            jobs = [[key, 1, 1] for key in range(start, start + per)]
            conn.write(JobSubmit(comp_id=1, jobs=jobs), argument * per)
            await conn.flush()
        await asyncio.sleep(1)  # (the last of them taken)
        before = sum(scheduler.cpu_times()[:2])
        for i in range(CANCELS):
            conn.write(JobCancel(comp_id=1, key=-1 - i, attempt=1))
        await conn.flush()
        start = time.monotonic()
        alices = await alices_jobs_meanwhile(sched.address, people["alice"])
        took = time.monotonic() - start
        return alices, took, sum(scheduler.cpu_times()[:2]) - before
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-cancel-absent",
    title=f"A scheduler user with {QUEUED:,} jobs queued cancels {CANCELS:,} keys "
    "not queued; another user runs four jobs meanwhile",
    goal=f"the other user's jobs done within {ALICE_WAIT:.0f} s, the scheduler "
    f"spends under {CPU_BOUND:.0f} s of CPU on the cancels (was: its loop held "
    "4.7 s and more: the other user's client could not finish its handshake)",
)
def test_cancels_of_keys_not_queued_do_not_hold_the_scheduler(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(tmp_path, people, "--max_user_args", "4G") as sched:
        alices, took, cpu = asyncio.run(_attack(sched, people))
    measure(f"alice's results {alices} in {took:.1f} s; scheduler CPU {cpu:.2f} s")
    assert alices == [0, 1, 4, 9]
    assert took < ALICE_WAIT and cpu < CPU_BOUND
