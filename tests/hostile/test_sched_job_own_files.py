"""One user of a scheduler queues jobs that list very many files of their own.

A job's entry in a `JobSubmit` may list the job's own files (``[path, digest]``
each: its ``depends``, `JobCluster.put`'s objects). The scheduler holds the entry
while the job waits, counted as `JOB_COST` (512 bytes) whatever it held: a job
listing 60,000 files (4.4 MiB sent) held 20 MiB, and an entry of 200,000 empty
lists (200 KB sent) 11 MiB, all counted as 512 bytes against --max_user_args. The
files a job lists count now, and an entry of another shape is refused.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from dispynb.protocol import serialize
from dispynb.protocol.messages import JobSubmit
from tests.hostile.test_sched_job_buffers import nap
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
#: Mallory's quota, her jobs (a message each) and the files each lists, and what
#: the scheduler may grow by meanwhile.
QUOTA = 32 * MiB
MESSAGES = 12
FILES = 60_000
BOUND = 96 * MiB
#: Seconds each step may take.
WAIT = 60


async def _queue(sched: SchedulerProcess, credential: Path) -> tuple[int, list[str]]:
    """Take every CPU with jobs that sleep, then queue `MESSAGES` jobs listing
    `FILES` files each, and one whose files are 200,000 empty lists: the
    scheduler's growth, and the refusals."""
    assert sched.proc is not None
    scheduler = psutil.Process(sched.proc.pid)
    conn = await raw_scheduler_session(sched.port, credential)
    try:
        await set_up_raw(conn, nap, name="own-files", timeout=WAIT)
        submit_raw(conn, [(key,) for key in range(4)])
        await conn.flush()
        before = scheduler.memory_info().rss
        for key in range(4, 4 + MESSAGES):
            files = [[f"f{i}", f"{key:02x}{i:062x}"] for i in range(FILES)]
            args = serialize.dumps(((key,), {}))
            conn.write(JobSubmit(comp_id=1, jobs=[[key, 1, len(args), files]]), args)
            await conn.flush()
        args = serialize.dumps(((0,), {}))
        empty: list[list[str]] = [[] for _ in range(200_000)]
        conn.write(JobSubmit(comp_id=1, jobs=[[99, 1, len(args), empty]]), args)
        refusals = await refusals_within(conn, 5, MESSAGES)
        return scheduler.memory_info().rss - before, refusals
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-job-own-files",
    title=f"A scheduler user queues {MESSAGES} jobs listing {FILES:,} files of their "
    "own each, and one listing 200,000 empty lists (--max_user_args "
    f"{QUOTA // MiB}M)",
    goal=f"the scheduler grows by under {BOUND // MiB} MiB: the jobs over her quota "
    "refused naming --max_user_args, the empty lists as malformed; another "
    "user's jobs run (was: 512 bytes counted a job: +265 MiB)",
)
def test_a_jobs_own_files_count_in_the_users_args_quota(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    grown, refusals, alices = args_quota_attack(tmp_path, people, QUOTA, _queue)
    quota = [text for text in refusals if "--max_user_args" in text]
    malformed = [text for text in refusals if "malformed" in text]
    measure(
        f"scheduler +{grown / MiB:.0f} MiB; {len(quota)} of {MESSAGES} jobs refused "
        f"over the quota ({quota[0][:60] if quota else 'none'}...), "
        f"{malformed[0][:70] if malformed else 'the empty lists taken'}; alice's "
        f"results {alices}"
    )
    assert grown < BOUND
    assert len(quota) >= MESSAGES - QUOTA // (20 * MiB) - 1 and malformed
    assert alices == [0, 1, 4, 9]
