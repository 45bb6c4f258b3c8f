"""Files a job sends through the scheduler (``dispy_send_file``) named as its
client's recovery journal, or the files SQLite keeps beside it, are refused by the
client as from a node of its own (tests/hostile/test_sent_journal.py): the job gets
-1 and why, the journal stays whole. A real scheduler, real nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from dispynb.job import JobStatus
from tests.hostile.test_sent_journal import CONTROL, JOURNAL_NAMES, PLANTED
from tests.sharedsched.harness import SchedulerProcess

pytestmark = pytest.mark.slow


def plant(names: list[str], planted: bytes) -> list[int]:
    """Write ``planted`` under each name and send it: what each call returned."""
    sent = []
    for name in names:
        with open(name, "wb") as handle:
            handle.write(planted)
        sent.append(dispy_send_file(name))  # type: ignore[name-defined]  # noqa: F821
    return sent


def test_a_job_behind_the_scheduler_cannot_replace_its_clients_journal(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # the files go there (no files_dir), as _dispy_*
    journal = tmp_path / "journal.db"
    names = [*JOURNAL_NAMES, CONTROL]
    with SharedJobCluster(
        plant,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        recover_file=str(journal),
    ) as cluster:
        job = cluster.submit(names, PLANTED)
        assert job.wait(timeout=30)
        # Before the cluster closes (and removes its journal).
        planted = [p.name for p in tmp_path.iterdir() if p.is_file()
                   and PLANTED in p.read_bytes()]  # fmt: skip
        header = journal.read_bytes()[:16]
    assert (job.status, job.result) == (
        JobStatus.Finished,
        [-1] * len(JOURNAL_NAMES) + [0],
    ), (job.exception, job.stderr)
    assert planted == [CONTROL]
    assert header == b"SQLite format 3\0"
    for name in JOURNAL_NAMES:
        assert f"{name!r} not sent" in job.stderr, job.stderr
