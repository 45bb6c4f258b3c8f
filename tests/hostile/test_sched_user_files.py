"""One user of a scheduler hoards the disk with the files she sends.

The scheduler keeps each file a client sends (``depends``, ``send_file``) on disk
under ``--dest_path_prefix`` while a computation or the session that sent it lives:
``--max_file_size`` bytes each (512 MiB), ``--max_files`` files per user. Counted
apart from ``--max_user_kept``, one user's 128 files held 64 GiB there, up to 1 GiB
short of a full disk, which left the other users' kept results that last GiB. Her
files count in her ``--max_user_kept`` now: past it they are refused, naming it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from dispynb.errors import DispynbError
from dispynb.protocol.files import digest_of
from dispynb.protocol.messages import (
    Error,
    FilePut,
    FileRelease,
)
from dispynb.transport.connection import Connection
from tests.hostile.test_scheduler import people, shared_nodes
from tests.hostile.tools import wait_for
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    set_up_raw,
    submit_raw,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: Each file mallory sends, how many, and what each user may hold in all (3 files).
FILE = 3 * MiB
FILES = 6
USER_QUOTA = 10 * MiB
#: Seconds each step may take.
WAIT = 30


async def _send(conn: Connection, count: int, refusals: int) -> list[str]:
    """Send ``count`` distinct files of `FILE` bytes (no computation lists them:
    the session holds them); the scheduler's refusals, once ``refusals`` came (or
    `WAIT` seconds passed)."""
    for i in range(count):
        data = memoryview(bytes([i]) * FILE)
        conn.write(FilePut(digest=digest_of(data), size=data.nbytes), [data])
        await conn.flush()
    errors: list[str] = []
    try:
        async with asyncio.timeout(WAIT):
            while len(errors) < refusals:
                message, _ = await conn.recv()
                if isinstance(message, Error):
                    errors.append(message.message)
    except TimeoutError:
        pass
    return errors


def file_size(name: str) -> int:
    """A job: the size of a file in its directory."""
    import os

    return os.path.getsize(name)


def _run_with(address: str, credential: Path, path: Path) -> int | str:
    """A real client's cluster that depends on ``path``: its job's answer, or
    what the client met instead."""
    try:
        with SharedJobCluster(
            file_size,
            scheduler_host=address,
            secret_file=str(credential),
            depends=[str(path)],
        ) as cluster:
            return int(cluster.submit(path.name)())
    except DispynbError as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.attack(
    id="sched-user-files-hoard",
    title=f"A scheduler user sends {FILES} files of {FILE // MiB} MiB from one "
    f"session and keeps it open (--max_user_kept {USER_QUOTA // MiB}M); then her "
    "cluster, and another user's, depend on one more",
    goal="her files past the quota refused, naming --max_user_kept, and so her "
    "cluster's setup; the other user's cluster runs (was: files counted apart, "
    "64 GiB a user)",
)
def test_one_users_files_count_in_her_quota(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    extra = {name: tmp_path / f"{name}.bin" for name in ("mallory", "alice")}
    for path in extra.values():  # distinct: files are shared by digest
        path.write_bytes(os.urandom(2 * MiB))
    with shared_nodes(
        tmp_path, people,
        "--max_user_kept", f"{USER_QUOTA // MiB}M",
        "--dest_path_prefix", str(tmp_path / "spill"),
    ) as sched:  # fmt: skip

        async def attack() -> tuple[list[str], int | str, int | str]:
            conn = await raw_scheduler_session(sched.port, people["mallory"])
            try:
                refused = await _send(conn, FILES, FILES - USER_QUOTA // FILE)
                # While her session holds her files: her cluster, then alice's.
                hers, alices = [
                    await asyncio.to_thread(
                        _run_with, sched.address, people[name], extra[name]
                    )
                    for name in ("mallory", "alice")
                ]
                return refused, hers, alices
            finally:
                conn.close()

        refused, hers, alices = asyncio.run(attack())
    measure(
        f"mallory: {FILES - len(refused)} of {FILES} files kept, {len(refused)} "
        f"refused ({refused[0][:110] if refused else 'none'}...); her cluster: "
        f"{str(hers)[:90]}; alice's cluster: {alices}"
    )
    assert len(refused) == FILES - USER_QUOTA // FILE
    assert all("--max_user_kept" in text for text in refused)
    assert isinstance(hers, str) and "--max_user_kept" in hers
    assert alices == 2 * MiB


#: The computation held by her files' share of her quota: its jobs (more than the
#: 4 CPUs) and each one's result.
HELD_JOBS = 16
HELD_RESULT = 2 * MiB


def two_mib(n: int, go: str) -> bytes:
    """2 MiB, once ``go`` exists: its client has gone (only what ends then is
    kept). It slept 0.3 s, which a loaded scheduler took to see the client go."""
    wait_for(lambda: os.path.exists(go), f"{go} made", timeout=60)
    return bytes([n]) * (2 << 20)


async def _away(sched: SchedulerProcess, credential: Path, recovery_id: str) -> None:
    """Set up a computation with ``recovery_id``, submit its jobs and go away; once
    the scheduler saw it go, let its jobs end (it keeps their results, within her
    quota)."""
    go = sched.directory / "held.go"
    conn = await raw_scheduler_session(sched.port, credential)
    try:
        await set_up_raw(
            conn, two_mib, name="held", recovery_id=recovery_id,
            keep_results=600.0, keep_sent=False, timeout=WAIT,
        )  # fmt: skip
        submit_raw(conn, [(i, str(go)) for i in range(HELD_JOBS)])
        await conn.flush()
    finally:
        conn.close()
    await asyncio.to_thread(sched.wait_for_log, "held: client gone", timeout=WAIT)
    go.touch()


@pytest.mark.parametrize("release", ["file-release", "session-end"])
def test_files_released_let_a_computation_held_by_her_quota_run(
    tmp_path: Path, people: dict[str, Path], release: str
) -> None:
    """Alice's files take most of her quota; her computation whose client went
    away is held once its results fill the rest. The files released (her jobs
    that needed them ended, or the session that sent them ended), its jobs run
    again at once, not at whatever next event makes the scheduler dispatch (on
    an idle scheduler: when she comes back, the time she was away lost)."""
    files = [memoryview(bytes([i]) * FILE) for i in range(2)]
    digests = [digest_of(data) for data in files]
    with shared_nodes(
        tmp_path, people,
        "--max_user_kept", f"{USER_QUOTA // MiB}M",
        "--dest_path_prefix", str(tmp_path / "spill"),
        # One job a CPU on the nodes: once the first results fill her quota, jobs
        # still wait here (with jobs instant once let go, the nodes' window of
        # jobs sent ahead took them all before: nothing was left to hold).
        "--jobs_per_cpu", "1",
    ) as sched:  # fmt: skip

        async def scenario() -> None:
            conn = await raw_scheduler_session(sched.port, people["alice"])
            try:
                for digest, data in zip(digests, files, strict=True):
                    conn.write(FilePut(digest=digest, size=data.nbytes), [data])
                await conn.flush()
                await _away(sched, people["alice"], secrets.token_hex(16))
                await asyncio.to_thread(
                    sched.wait_for_log, "alice/held: no job of it runs", timeout=WAIT
                )
                assert "room freed" not in sched.log_text()
                if release == "file-release":
                    conn.write(FileRelease(digests=digests))
                    await conn.flush()
                else:
                    conn.close()
                await asyncio.to_thread(
                    sched.wait_for_log,
                    "alice/held: room freed in the --max_user_kept quota",
                    timeout=WAIT,
                )
            finally:
                conn.close()

        asyncio.run(scenario())
