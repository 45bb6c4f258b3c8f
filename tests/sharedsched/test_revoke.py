"""A user revoked while its cluster runs (``dispynb-scheduler user revoke``, or the
web monitor): its jobs end at once saying it was revoked, and its cluster neither
waits for the scheduler to come back nor tries its refused credential again."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import DispyJob, SharedJobCluster
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess, scheduler_cli

pytestmark = pytest.mark.slow


def _long(n: int) -> int:
    import time

    time.sleep(60)
    return n


def test_a_revoked_users_jobs_end_saying_so(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """Running and queued jobs end Abandoned with the reason, and so does one
    submitted after; the cluster closes without waiting for them."""
    cluster = SharedJobCluster(
        _long, scheduler_host=scheduler.address, secret_file=str(users["bob"])
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
            assert "user 'bob' was revoked" in (job.exception or ""), job.exception
    finally:
        cluster.close(timeout=20)
    assert "rejected connections" not in scheduler.log_text()
