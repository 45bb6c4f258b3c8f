"""``dispy_send_file`` through the scheduler tells the job the truth: 0 once its
client wrote the file, -1 and why when the client could not."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from tests.sharedsched.harness import SchedulerProcess

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
