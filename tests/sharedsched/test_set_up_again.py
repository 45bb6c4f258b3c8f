"""A client that lost the scheduler sets its computation up again on a new
session before the scheduler has noticed that the old session ended (a cut link:
the old connection's end is read later). The jobs it left there were given up:
they must not run on for nobody on the shared node, whichever the scheduler
notices first, the new setup or the old session's end.

A raw client (two sessions of one user, in the order the race takes) on a real
scheduler and a real one-CPU node from the command line.
"""

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
    Message,
)
from dispynb.transport.connection import Connection
from tests.chaos.outcomes import wait_stopped
from tests.chaos.test_frozen_node import mark_and_hold
from tests.jobs import wait_until
from tests.nodeproc import start_node
from tests.sharedsched.harness import SchedulerProcess, add_user, raw_scheduler_session

pytestmark = pytest.mark.slow

RECOVERY_ID = "c" * 32


def _setup() -> tuple[ComputationSetup, list[memoryview]]:
    """The client's computation (`mark_and_hold`), kept for its recovery."""
    bundle = serialize.dumps({"func": mark_and_hold, "setup": None, "setup_args": ()})
    setup = ComputationSetup(
        comp_id=1, name="set-up-again", workers=1, recovery_id=RECOVERY_ID,
        keep_results=120.0,
    )  # fmt: skip
    return setup, bundle


async def _until(conn: Connection, kind: type[Message]) -> Message:
    """The first message of type ``kind`` on ``conn`` (others are skipped)."""
    while True:
        message, _buffers = await conn.recv()
        if isinstance(message, kind):
            return message


def _submit(conn: Connection, keys: range, marks: Path, release: Path) -> None:
    """Submit jobs ``keys`` of `mark_and_hold` on ``conn``."""
    jobs, buffers = [], []
    for key in keys:
        item = serialize.dumps(((key, str(marks), str(release)), {}))
        jobs.append([key, 0, len(item)])
        buffers.extend(item)
    conn.write(JobSubmit(comp_id=1, jobs=jobs), buffers)


@pytest.mark.timeout(90)
def test_jobs_left_on_a_session_whose_end_comes_after_the_new_setup_stop(
    tmp_path: Path,
) -> None:
    """Before, the new setup found the old computation still with its session and
    left it; the old session's end then kept it for the client's recovery: its
    running job ran on to its end, then its queued job started, on a shared CPU."""
    marks, release = tmp_path / "marks", tmp_path / "release"
    marks.mkdir()
    node = start_node(tmp_path / "node", cpus=1)
    credential = add_user(tmp_path, "alice")
    scheduler = SchedulerProcess(tmp_path, [node.spec], node.secret)

    async def scenario() -> list[int]:
        setup, bundle = _setup()
        old = await raw_scheduler_session(scheduler.port, credential)
        new = None
        try:
            old.write(setup, bundle)
            await _until(old, ComputationReady)
            _submit(old, range(2), marks, release)  # one runs, one waits behind
            await asyncio.to_thread(
                wait_until, lambda: (marks / "0").exists(), timeout=30
            )
            # The client gave the old session up (a cut link) and sets up again:
            # the scheduler reads this before the old connection's end.
            new = await raw_scheduler_session(scheduler.port, credential)
            new.write(setup, bundle)
            await _until(new, ComputationReady)
        finally:
            old.close()
        try:
            worker = int((marks / "0").read_text())
            await asyncio.to_thread(wait_stopped, worker, 20)
            release.touch()
            _submit(new, range(2, 3), marks, release)
            ended: list[int] = []
            while not ended:
                results = await _until(new, JobResults)
                assert isinstance(results, JobResults)
                ended = [entry[0] for entry in results.results]
            return ended
        finally:
            new.close()

    try:
        scheduler.start()
        assert asyncio.run(asyncio.wait_for(scenario(), 60)) == [2]
    finally:
        release.touch()
        scheduler.stop()
        node.stop()
    assert (marks / "2").exists()  # the new computation's job ran
    assert not (marks / "1").exists(), "a job its client gave up started afterwards"
    assert "the jobs it left are terminated" in scheduler.log_text()
