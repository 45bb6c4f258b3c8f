"""The recovery journal is private to its owner: 0600 for the file, -wal and -shm."""

from __future__ import annotations

import os
import stat

from dispynb.job import DispyJob
from dispynb.journal import Journal


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_journal_and_its_wal_and_shm_are_0600_even_under_umask_0(tmp_path):
    path = str(tmp_path / "recover.db")
    old = os.umask(0)  # the loosest a user could have: nothing may rely on umask
    try:
        journal = Journal(path)
        journal.computation("rid", "compute")
        journal.submitted("rid", 1, DispyJob(None, (1,), {}))
        for suffix in ("", "-wal", "-shm"):
            assert _mode(path + suffix) == 0o600, suffix
        journal.close()
    finally:
        os.umask(old)


def test_a_loose_existing_journal_is_tightened(tmp_path):
    path = tmp_path / "recover.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    Journal(str(path)).close()
    assert _mode(str(path)) == 0o600


def test_jobs_sent_together_are_recorded_together(tmp_path):
    """A node's message of jobs is one transaction: each is recorded sent to it."""
    journal = Journal(str(tmp_path / "recover.db"))
    journal.computation("rid", "compute")
    for key in range(4):
        journal.submitted("rid", key, DispyJob(key, (key,), {}))
    journal.sent("rid", [0, 2, 3], "10.0.0.1:9711")
    recorded = {key: node for key, _job, node in journal.jobs("rid")}
    journal.close()
    node = "10.0.0.1:9711"
    assert recorded == {0: node, 1: None, 2: node, 3: node}
