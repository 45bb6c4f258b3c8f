"""The bound on `ResultsJournaled` (the jobs kept for the client, plus
`ACKS_SLACK`) never refuses a legitimate client: every result the scheduler sends
a client that acknowledges is kept (tracked) until that client acknowledges it,
so even a client that acknowledges thousands of results in one message names at
most what is kept for it. A longer one (only a hostile or broken client sends it)
is refused, saying why, and changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ComputationReady,
    ComputationSetup,
    JobResults,
    JobSubmit,
    Recover,
    Recovered,
    ResultsJournaled,
)
from dispynb.secret import read_secret_file
from dispynb.transport.connector import connect
from schedserver.session import ACKS_SLACK
from tests.sharedsched.harness import SchedulerProcess, refusals_before_round_trip

pytestmark = pytest.mark.slow

#: Jobs the client runs and then acknowledges in one message: more than the slack.
JOBS = 3 * ACKS_SLACK
RECOVERY_ID = "b" * 32


def square(n: int) -> int:
    return n * n


async def _run_and_acknowledge_at_once(
    sched: SchedulerProcess, credential: Path
) -> tuple[list[str], list[str]]:
    """Run `JOBS` jobs, journal-acknowledge them all in one message, then send one
    naming `ACKS_SLACK` + 1 jobs that were never kept; the refusals after each."""
    conn, _ = await connect(
        "127.0.0.1", sched.port, secret=read_secret_file(credential),
        max_message_size=64 << 20,
    )  # fmt: skip
    try:
        bundle = serialize.dumps({"func": square, "setup": None, "setup_args": ()})
        setup = ComputationSetup(
            comp_id=1, name="batched-acks", workers=2, recovery_id=RECOVERY_ID,
            keep_results=120.0,
            keep_sent=True, ack_journaled=True,
        )  # fmt: skip
        conn.write(setup, bundle)
        payload = serialize.dumps(((3,), {}))
        message, _ = await conn.recv()
        while not isinstance(message, ComputationReady):
            message, _ = await conn.recv()
        assert message.acks_journaled
        jobs = [[key, 0, len(payload)] for key in range(JOBS)]
        conn.write(JobSubmit(comp_id=1, jobs=jobs), list(payload) * JOBS)
        ended: list[list[int]] = []
        while len(ended) < JOBS:
            message, _ = await conn.recv()
            if isinstance(message, JobResults):
                ended.extend([entry[0], entry[1]] for entry in message.results)
        conn.write(ResultsJournaled(comp_id=1, jobs=ended))  # all at once
        batched = await refusals_before_round_trip(conn)
        never_kept = [[key, 0] for key in range(JOBS, JOBS + ACKS_SLACK + 1)]
        conn.write(ResultsJournaled(comp_id=1, jobs=never_kept))
        return batched, await refusals_before_round_trip(conn)
    finally:
        conn.close()


async def _recovered_results(sched: SchedulerProcess, credential: Path) -> int:
    """Results the scheduler still kept for the client, as a recovering client
    gets them."""
    conn, _ = await connect(
        "127.0.0.1", sched.port, secret=read_secret_file(credential),
        max_message_size=64 << 20,
    )  # fmt: skip
    try:
        conn.write(Recover(comp_id=1, recovery_id=RECOVERY_ID))
        results = 0
        message, _ = await conn.recv()
        while not isinstance(message, Recovered):
            if isinstance(message, JobResults):
                results += len(message.results)
            message, _ = await conn.recv()
        assert message.found
        return results
    finally:
        conn.close()


@pytest.mark.timeout(180)
def test_a_client_acknowledging_thousands_at_once_is_within_the_bound(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    async def scenario() -> tuple[list[str], list[str], int]:
        async with asyncio.timeout(150):
            batched, hostile = await _run_and_acknowledge_at_once(
                scheduler, users["alice"]
            )
            return batched, hostile, await _recovered_results(scheduler, users["alice"])

    batched, hostile, kept = asyncio.run(scenario())
    assert batched == []  # JOBS acknowledgements in one message: taken
    assert kept == 0  # and they dropped every kept result
    assert len(hostile) == 1, hostile
    assert f"names {ACKS_SLACK + 1} jobs" in hostile[0]
    assert "has 0 kept" in hostile[0] and f"at most {ACKS_SLACK}" in hostile[0]
    assert scheduler.proc is not None and scheduler.proc.poll() is None
