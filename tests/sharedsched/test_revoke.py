"""A user revoked while its cluster runs (``dispynb-scheduler user revoke``, or the
web monitor): its jobs end at once saying it was revoked, and its cluster neither
waits for the scheduler to come back nor tries its refused credential again. A
credential replaced in the users file is refused at once, however the file was
replaced."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

from dispynb import DispyJob, SharedJobCluster
from dispynb.errors import AuthenticationError
from dispynb.protocol.messages import NodeStatus
from dispynb.transport.connection import Connection
from tests.jobs import wait_until
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    scheduler_cli,
)

pytestmark = pytest.mark.slow


def _long(n: int) -> int:
    import time

    time.sleep(60)
    return n


def _square(n: int) -> int:
    return n * n


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_revoked_users_jobs_end_saying_so(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path, reentrant: bool
) -> None:
    """Running and queued jobs end Abandoned with the reason (reentrant ones too:
    they have nowhere to run), and so does one submitted after; the cluster closes
    without waiting for them. The reason used to read "node 127.0.0.1:PORT was
    lost (user ... revoked ...)", or "no node is available (last node error...)"."""
    cluster = SharedJobCluster(
        _long,
        scheduler_host=scheduler.address,
        secret_file=str(users["bob"]),
        reentrant=reentrant,
    )
    try:
        jobs = [cluster.submit(n) for n in range(6)]  # 4 CPUs: 2 wait
        wait_until(lambda: any(job.status == DispyJob.Running for job in jobs))
        done = scheduler_cli(
            "user", "revoke", "bob", "--users", str(tmp_path / "users")
        )
        assert done.returncode == 0, done.stderr
        assert cluster.wait(timeout=20)
        late = cluster.submit(6)
        assert cluster.wait(timeout=20)
        for job in [*jobs, late]:
            assert job.status == DispyJob.Abandoned, job
            # In the scheduler's words, not a node's loss (the scheduler is none).
            assert (job.exception or "").startswith("user 'bob' was revoked"), job
    finally:
        cluster.close(timeout=20)
    assert "rejected connections" not in scheduler.log_text()


def test_a_users_file_replaced_keeping_its_mtime_is_read_again(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """A users file copied over with its time kept (``rsync -a``, ``cp -p``, a
    restored backup) where alice's token was replaced by one of the same length:
    her old credential is refused and the new one taken (the file was taken as
    unchanged by its time and size)."""
    path = tmp_path / "users"
    with SharedJobCluster(
        _square, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        assert cluster.submit(3)() == 9
    old = path.stat()
    token = secrets.token_urlsafe(32)
    lines = [
        f"alice {token}" if line.startswith("alice ") else line
        for line in path.read_text().splitlines()
    ]
    copy = tmp_path / "users.rsync"
    copy.write_text("\n".join(lines) + "\n")
    copy.chmod(0o600)
    os.utime(copy, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert copy.stat().st_size == old.st_size
    copy.replace(path)
    with pytest.raises(AuthenticationError):
        SharedJobCluster(
            _square, scheduler_host=scheduler.address, secret_file=str(users["alice"])
        )
    renewed = tmp_path / "alice.renewed"
    renewed.write_text(f"dispynb-user:alice:{token}\n")
    renewed.chmod(0o600)
    with SharedJobCluster(
        _square, scheduler_host=scheduler.address, secret_file=str(renewed)
    ) as cluster:
        assert cluster.submit(4)() == 16


def test_a_session_whose_token_was_replaced_ends(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """alice's token replaced in the users file (a leaked credential renewed by
    hand) while her cluster runs: her session ends as a revoked user's; bob's goes
    on."""
    path = tmp_path / "users"
    alice = SharedJobCluster(
        _long, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    )
    try:
        with SharedJobCluster(
            _square, scheduler_host=scheduler.address, secret_file=str(users["bob"])
        ) as bob:
            job = alice.submit(1)
            wait_until(lambda: job.status == DispyJob.Running)
            lines = [
                f"alice {secrets.token_urlsafe(32)}"
                if line.startswith("alice ")
                else line
                for line in path.read_text().splitlines()
            ]
            renewed = tmp_path / "users.new"
            renewed.write_text("\n".join(lines) + "\n")
            renewed.chmod(0o600)
            renewed.replace(path)
            assert alice.wait(timeout=20)
            assert "user 'alice' was revoked" in (job.exception or ""), job.exception
            assert bob.submit(5)() == 25
    finally:
        alice.close(timeout=20)


def test_a_users_file_that_cannot_be_read_is_one_warning_not_one_a_pulse(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """``chmod 644`` of the users file by mistake: one warning (the users read
    before are kept), and one line once it is fixed, not a warning every pulse
    (86,400 a day at the default pulse). Pulses are counted by the status reports
    a user's session gets at each."""
    path = tmp_path / "users"

    async def watch() -> None:
        conn = await raw_scheduler_session(scheduler.port, users["alice"])
        try:
            await _reports(conn, 1)
            path.chmod(0o644)
            await _reports(conn, 5)
            path.chmod(0o600)
            await _reports(conn, 3)
        finally:
            conn.close()

    asyncio.run(watch())
    log = scheduler.log_text()
    assert log.count("cannot read the users file") == 1, log
    assert log.count("the users file is read again") == 1, log


async def _reports(conn: Connection, count: int) -> None:
    """Wait for ``count`` status reports of the scheduler (one a pulse)."""
    async with asyncio.timeout(20):
        while count:
            message, _ = await conn.recv()
            count -= isinstance(message, NodeStatus)


def test_a_removed_users_file_keeps_the_users_and_their_sessions(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """``rm`` of the users file (a mistake, or a tool writing it anew in two steps)
    read as 'no users': every session ended at once, revoked. Now the users read
    before are kept, sessions and new connections alike, with one warning saying
    how to revoke everyone on purpose; the file put back is read again."""
    path = tmp_path / "users"
    saved = path.read_bytes()

    async def watch() -> None:
        conn = await raw_scheduler_session(scheduler.port, users["alice"])
        try:
            await _reports(conn, 1)
            path.unlink()
            await _reports(conn, 4)  # a revoked session gets an Error, then ends
            other = await raw_scheduler_session(scheduler.port, users["bob"])
            other.close()
            path.write_bytes(saved)
            path.chmod(0o600)
            await _reports(conn, 3)
        finally:
            conn.close()

    asyncio.run(watch())
    log = scheduler.log_text()
    assert log.count(f"{path} was removed") == 1, log
    assert "leave an empty file" in log
    assert "revoked" not in log, log
    assert log.count("the users file is read again") == 1, log
