"""A scheduler user submits more jobs' arguments than the scheduler's memory holds.

The scheduler holds each job's arguments (views of the client's message) while the
job waits in its queue and while it runs on a node (to run it elsewhere if the node
is lost): a raw client submitting jobs of 4 MiB arguments faster than they run grew
the shared scheduler by what it sent, until the machine ran out of memory for every
user. ``--max_user_args`` bounds what one user's jobs hold there.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import psutil
import pytest

from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    CANCELLED,
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    JobResults,
    JobSubmit,
)
from dispynb.protocol.records import ResultEntry
from tests.hostile.test_scheduler import alices_jobs_meanwhile, people, shared_nodes
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    set_up_raw,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: Messages of 16 jobs of 4 MiB arguments each mallory sends (512 MiB in all), and
#: the quota of the scheduler she sends them to.
MESSAGES = 8
ARGUMENT = 4 * MiB
QUOTA = 128 * MiB
#: What the scheduler may grow by: the quota, what is read ahead of a message
#: refused, and allocator slack.
BOUND = QUOTA + 128 * MiB


def long_job(data: bytes) -> int:
    import time

    time.sleep(8)  # (holding the CPUs: the others wait in the queue)
    return len(data)


async def _flood(
    sched: SchedulerProcess, people: dict[str, Path]
) -> tuple[int, int, int, list[ResultEntry], list[int] | str]:
    assert sched.proc is not None
    scheduler = psutil.Process(sched.proc.pid)
    conn = await raw_scheduler_session(sched.port, people["mallory"])
    try:
        await set_up_raw(conn, long_job, name="flood")
        before = peak = scheduler.memory_info().rss
        argument = serialize.dumps(((b"a" * ARGUMENT,), {}))
        key = 0
        for _ in range(MESSAGES):
            jobs = [[key + i, 1, len(argument)] for i in range(16)]
            key += 16
            conn.write(JobSubmit(comp_id=1, jobs=jobs), argument * 16)
            await conn.flush()
            peak = max(peak, scheduler.memory_info().rss)
        refused: list[ResultEntry] = []
        with contextlib.suppress(TimeoutError):  # (none came: the figures say it)
            async with asyncio.timeout(20):
                while len(refused) < key - QUOTA // ARGUMENT:
                    message, _ = await conn.recv()
                    if isinstance(message, JobResults):
                        refused += [
                            entry
                            for entry, _streamed in map(
                                ResultEntry.from_wire, message.results
                            )
                            if entry.outcome == CANCELLED
                        ]
                    peak = max(peak, scheduler.memory_info().rss)
        alices = await alices_jobs_meanwhile(sched.address, people["alice"])
        peak = max(peak, scheduler.memory_info().rss)
        return before, peak, key, refused, alices
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-queued-arguments",
    title=f"A scheduler user submits {MESSAGES * 16} jobs of {ARGUMENT // MiB} MiB "
    f"arguments, all at once, to a scheduler with --max_user_args {QUOTA // MiB}M",
    goal=f"scheduler RSS growth under {BOUND // MiB} MiB; the jobs past the quota "
    "refused with an error naming it; the victim's jobs run (was: +520 MiB for "
    "512 MiB sent, without bound)",
)
def test_one_users_job_arguments_are_bounded_at_the_scheduler(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(tmp_path, people, "--max_user_args", f"{QUOTA // MiB}M") as sched:
        before, peak, sent, refused, alices = asyncio.run(_flood(sched, people))
        lines = sched.log_text().count("--max_user_args")
    grown = peak - before
    why = str(refused[0].exception) if refused else "none"
    measure(
        f"scheduler RSS {before // MiB} -> peak {peak // MiB} MiB (+{grown // MiB} "
        f"MiB) for {sent * ARGUMENT // MiB} MiB sent; {len(refused)} of {sent} jobs "
        f"refused ({why[:80]}...); {lines} log line(s); alice's results {alices}"
    )
    assert grown < BOUND
    assert len(refused) >= sent - QUOTA // ARGUMENT
    assert "--max_user_args" in why and "'mallory'" in why
    assert lines == 1
    assert alices == [0, 1, 4, 9]


#: Computations mallory sets up, each with functions of this size (what the scheduler
#: keeps whole, to set it up on nodes that join later).
SETUPS = 6
BUNDLE = 48 * MiB


async def _large_setups(
    sched: SchedulerProcess, people: dict[str, Path]
) -> tuple[int, int, list[str], int, list[int] | str]:
    assert sched.proc is not None
    scheduler = psutil.Process(sched.proc.pid)
    big = b"b" * BUNDLE

    def sized(n: int) -> int:
        return len(big) + n

    bundle = serialize.dumps({"func": sized, "setup": None, "setup_args": ()})
    sessions = []
    failed: list[str] = []
    ready = 0
    before = peak = scheduler.memory_info().rss
    try:
        for i in range(SETUPS):
            conn = await raw_scheduler_session(sched.port, people["mallory"])
            sessions.append(conn)
            conn.write(ComputationSetup(comp_id=1, name=f"big-{i}", workers=1), bundle)
            async with asyncio.timeout(60):
                while True:
                    message, _ = await conn.recv()
                    if isinstance(message, ComputationReady):
                        ready += 1
                        break
                    if isinstance(message, ComputationFailed):
                        failed.append(message.message)
                        break
            peak = max(peak, scheduler.memory_info().rss)
        alices = await alices_jobs_meanwhile(sched.address, people["alice"])
        return before, peak, failed, ready, alices
    finally:
        for conn in sessions:
            conn.close()


@pytest.mark.attack(
    id="sched-large-bundles",
    title=f"A scheduler user sets up {SETUPS} clusters whose functions take "
    f"{BUNDLE // MiB} MiB each, with --max_user_args {QUOTA // MiB}M",
    goal=f"scheduler RSS growth under {BOUND // MiB} MiB; the setups past the quota "
    "fail with an error naming it; the victim's jobs run (was: each kept whole, "
    "without bound but --max_computations)",
)
def test_one_users_computations_are_bounded_at_the_scheduler(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(tmp_path, people, "--max_user_args", f"{QUOTA // MiB}M") as sched:
        before, peak, failed, ready, alices = asyncio.run(_large_setups(sched, people))
    grown = peak - before
    measure(
        f"scheduler RSS {before // MiB} -> peak {peak // MiB} MiB (+{grown // MiB} "
        f"MiB); {ready} set up, {len(failed)} refused "
        f"({failed[0][:80] if failed else 'none'}...); alice's results {alices}"
    )
    assert grown < BOUND
    assert ready == QUOTA // BUNDLE and len(failed) == SETUPS - ready
    assert "--max_user_args" in failed[0]
    assert alices == [0, 1, 4, 9]
