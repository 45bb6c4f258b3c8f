"""``dispy_send_file`` through the scheduler tells the job the truth: 0 once its
client wrote the file, -1 and why when the client could not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.protocol.messages import (
    JobResults,
)
from dispynb.secret import read_secret_file
from dispynb.transport.connector import connect
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess, set_up_raw, submit_raw
from tests.sharedsched.test_kept import _scheduler

pytestmark = pytest.mark.slow


def send_to(folder: str) -> int:
    """Send ``folder/out.bin`` (1 KiB) to the client."""
    import os

    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/out.bin", "wb") as handle:
        handle.write(b"x" * 1024)
    return dispy_send_file(f"{folder}/out.bin")  # type: ignore[name-defined]  # noqa: F821


def test_the_clients_answer_reaches_the_job_through_the_scheduler(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "blocked").write_text("a file where the job's folder should be")
    monkeypatch.chdir(tmp_path)
    with SharedJobCluster(
        send_to,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        files_dir=str(tmp_path),
    ) as cluster:
        jobs = [cluster.submit("open"), cluster.submit("blocked"), cluster.submit("a")]
        assert cluster.wait(timeout=30)
    assert [job.result for job in jobs] == [0, -1, 0], [j.exception for j in jobs]
    assert (tmp_path / "open" / "out.bin").read_bytes() == b"x" * 1024
    assert "'blocked/out.bin' not sent" in jobs[1].stderr
    assert "is not a directory" in jobs[1].stderr, jobs[1].stderr


#: Results of 16 MiB the raw client leaves unread: 96 MiB, of which its connection
#: takes in about 40 (16 MiB of messages unread, a frame being read, the sockets'
#: buffers) before it pauses, so that more than the 32 MiB after which the scheduler
#: says it "does not read" wait there. With 4 (64 MiB) the scheduler was sometimes
#: left with less than 32 MiB to hold, said nothing, and the test waited in vain.
HOARDED = 6


def hoard(i: int, go: str, mark: str) -> object:
    """Jobs 0-5 return 16 MiB each (their client does not read them); job 6 then
    sends a 10 MiB file and notes what dispy_send_file returned and said."""
    import contextlib
    import io
    import os
    import time

    if i < HOARDED:
        return bytes([i]) * (16 << 20)
    while not os.path.exists(go):
        time.sleep(0.02)
    with open("big.bin", "wb") as handle:
        handle.write(b"f" * (10 << 20))
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        sent = dispy_send_file("big.bin")  # type: ignore[name-defined]  # noqa: F821
    with open(mark, "w") as handle:
        handle.write(f"{sent} {said.getvalue()}")
    return sent


@pytest.fixture
def small_quota(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler that holds 8 MiB at most for a client that does not read."""
    yield from _scheduler(tmp_path, nodes, "--max_kept", "8M")


async def _not_reading(
    sched: SchedulerProcess, credential: Path, go: Path, mark: Path
) -> int:
    """A raw client that submits `hoard`'s jobs and does not read until the last one
    has its answer (made to send once the scheduler holds a backlog for it);
    then it reads: how many results it got."""
    conn, _ = await connect(
        "127.0.0.1", sched.port, secret=read_secret_file(credential),
        max_message_size=1 << 30,
    )  # fmt: skip
    try:
        await set_up_raw(conn, hoard, name="hoard")
        submit_raw(conn, [(i, str(go), str(mark)) for i in range(HOARDED + 1)])
        await asyncio.to_thread(
            sched.wait_for_log, "does not read what is sent to it", timeout=60
        )
        go.touch()
        await asyncio.to_thread(wait_until, mark.exists, 60)
        got = 0
        async with asyncio.timeout(60):
            while got < HOARDED + 1:
                message, _ = await conn.recv()
                if isinstance(message, JobResults):
                    got += len(message.results)
        return got
    finally:
        conn.close()


@pytest.mark.timeout(180)
def test_a_file_for_a_client_that_does_not_read_over_the_quota_is_answered(
    small_quota: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """The file does not fit in what the scheduler holds for a client that does not
    read (--max_kept): it is dropped, and the job hears so at once, instead of
    waiting for an answer that never comes while the client stays connected."""
    go, mark = tmp_path / "go", tmp_path / "mark"
    got = asyncio.run(_not_reading(small_quota, users["alice"], go, mark))
    sent, said = mark.read_text().split(" ", 1)
    assert sent == "-1" and "does not read what is sent to it" in said, said
    assert "--max_kept" in said
    assert got == HOARDED + 1
