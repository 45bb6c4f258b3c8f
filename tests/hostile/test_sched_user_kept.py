"""One user of a scheduler hoards kept results in many computations.

The scheduler keeps what a computation with a recovery id returns while its client
is away, ``--max_kept`` bytes per computation and per session's backlog, on disk
under ``--dest_path_prefix``. One user with 16 computations and 32 sessions could
thus keep 48 GiB there: a disk that fills turns the other users' kept results into
errors. ``--max_user_kept`` bounds what one user keeps in all; past it that user's
own results become errors naming it, and the other users keep theirs.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from dispynb.protocol.messages import (
    FINISHED,
    JobResults,
    Recover,
    Recovered,
)
from dispynb.protocol.records import ResultEntry
from tests.hostile.test_scheduler import people, shared_nodes
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    set_up_raw,
    submit_raw,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: Each job's result, and the jobs of each computation (24 MiB kept each).
RESULT = 4 * MiB
JOBS = 6
#: What each user may keep in all: one computation's results, and half another's.
USER_QUOTA = 36 * MiB
#: Seconds each step may take.
WAIT = 60


def four_mib(n: int, go: str) -> bytes:
    """4 MiB, once ``go`` exists: its client has gone (only what ends then is kept:
    ``keep_sent=False``). It slept 0.3 s, and a scheduler slower than that to see
    the client go passed the results on to nobody: none kept."""
    import os
    import time

    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return bytes([n]) * (4 << 20)


async def _keep(port: int, credential: Path, name: str, go: Path) -> str:
    """Set up computation ``name`` with a recovery id, submit its jobs (which end
    once ``go`` exists) and go away (the scheduler keeps their results); its
    recovery id."""
    recovery_id = secrets.token_hex(16)
    conn = await raw_scheduler_session(port, credential)
    try:
        await set_up_raw(
            conn, four_mib, name=name, recovery_id=recovery_id,
            keep_results=600.0, keep_sent=False, timeout=WAIT,
        )  # fmt: skip
        submit_raw(conn, [(i, str(go)) for i in range(JOBS)])
        await conn.flush()
    finally:
        conn.close()
    return recovery_id


async def _recover(port: int, credential: Path, recovery_id: str) -> list[ResultEntry]:
    """The results the scheduler kept for ``recovery_id`` (its jobs all ended)."""
    conn = await raw_scheduler_session(port, credential, max_message_size=1 << 30)
    entries = []
    try:
        conn.write(Recover(comp_id=1, recovery_id=recovery_id))
        async with asyncio.timeout(WAIT):
            while True:
                message, _buffers = await conn.recv()
                if isinstance(message, JobResults):
                    entries += [ResultEntry.from_wire(r)[0] for r in message.results]
                elif isinstance(message, Recovered):
                    assert message.found and not message.running, message
                    return entries
    finally:
        conn.close()


def _kept_away(sched: SchedulerProcess, credential: Path, name: str, user: str) -> str:
    """`_keep`; once the scheduler saw its client go, let its jobs end, and wait
    until none of them runs (all ended, or held)."""
    go = sched.directory / f"{name}.go"
    recovery_id = asyncio.run(_keep(sched.port, credential, name, go))
    sched.wait_for_log(f"{user}/{name}: client gone", timeout=WAIT)
    go.touch()
    sched.wait_for_log(f"{user}/{name}: no job of it runs", timeout=WAIT)
    return recovery_id


def _tally(entries: list[ResultEntry]) -> tuple[int, list[str]]:
    """Results finished, and the errors of the others."""
    finished = [e for e in entries if e.outcome == FINISHED]
    return len(finished), [str(e.exception) for e in entries if e.outcome != FINISHED]


@pytest.mark.attack(
    id="sched-user-kept-hoard",
    title=f"A scheduler user keeps {JOBS} results of {RESULT // MiB} MiB in each of "
    "two computations whose client went away, then another user does in one "
    f"(--max_user_kept {USER_QUOTA // MiB}M)",
    goal="the hoarder keeps at most her quota, her other results are errors naming "
    "--max_user_kept; the other user recovers all hers (was: kept per computation "
    "only, 48 GiB a user)",
)
def test_one_user_cannot_keep_more_than_her_quota_in_all(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(
        tmp_path, people,
        "--max_user_kept", f"{USER_QUOTA // MiB}M",
        "--kept_memory", "8M",  # the rest on disk
        "--dest_path_prefix", str(tmp_path / "spill"),
    ) as sched:  # fmt: skip
        hoards = [
            _kept_away(sched, people["mallory"], f"hoard-{i}", "mallory")
            for i in range(2)
        ]
        alices = _kept_away(sched, people["alice"], "work", "alice")
        mallory = [
            asyncio.run(_recover(sched.port, people["mallory"], recovery_id))
            for recovery_id in hoards
        ]
        alice = asyncio.run(_recover(sched.port, people["alice"], alices))
        warnings = sched.log_text().count("(--max_user_kept)")
    kept, errors = _tally([entry for entries in mallory for entry in entries])
    alice_kept, alice_errors = _tally(alice)
    measure(
        f"mallory: {kept} results kept ({kept * RESULT // MiB} MiB), "
        f"{len(errors)} not ({errors[0][:90] if errors else 'none'}...); alice: "
        f"{alice_kept} of {JOBS} kept, errors {alice_errors}; {warnings} warning(s)"
    )
    assert kept * RESULT <= USER_QUOTA and kept + len(errors) == 2 * JOBS
    assert errors and all("--max_user_kept" in error for error in errors)
    assert "for user 'mallory' in all" in errors[0]
    assert alice_kept == JOBS and not alice_errors
    assert 1 <= warnings <= 2  # once per computation over it
