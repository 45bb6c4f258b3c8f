"""Results kept for a client that went away, spilled to a disk that fills up.

The scheduler runs in a mount namespace of its own whose ``--dest_path_prefix`` is
a 60 MiB tmpfs; its client's 8 jobs return 24 MiB each, and it keeps 8 MiB in
memory (``--kept_memory``): two results fit on the disk, the others do not."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from dispynb import LocalCluster, recover_jobs
from tests.sharedsched.harness import SchedulerProcess
from tests.sharedsched.test_kept import _kill_client_after_submit, assert_recovered_once

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1 << 20
DISK = 60 * MiB


def test_results_a_full_spill_disk_cannot_keep_become_errors_saying_so(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """A result that did not fit on the disk failed the scheduler's link to its node
    (a traceback, the node's other jobs lost); now it is kept as an error saying
    why, as one over --max_kept is, and the computation's queued jobs wait for the
    client: each job once, and the disk has its room back."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs in a mount namespace needs root and unshare")
    prefix = tmp_path / "spill"
    prefix.mkdir()
    mount = f'mount -t tmpfs -o size={DISK} tmpfs "$0" && exec "$@"'
    with SchedulerProcess(
        tmp_path, nodes.node_specs(), nodes.secret,
        args=("--dest_path_prefix", str(prefix), "--kept_memory", "8M"),
        launcher=("unshare", "-m", "--", "sh", "-c", mount, str(prefix)),
    ) as sched:  # fmt: skip
        assert sched.proc is not None
        journal = tmp_path / "big.journal"
        _kill_client_after_submit(sched, users["alice"], journal, tmp_path)
        sched.wait_for_log("no job of it runs, ", timeout=60)
        # The scheduler's tmpfs, as its own mount namespace sees it: the result
        # that did not fit left nothing there.
        stats = os.statvfs(f"/proc/{sched.proc.pid}/root{prefix}")
        assert stats.f_bavail * stats.f_frsize >= 8 * MiB
        log = sched.log_text()
        jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=60)
    assert "Traceback" not in log and " ERROR " not in log and "lost" not in log, log
    assert log.count("(--dest_path_prefix) is full (No space left on device)") == 1
    held = re.search(r"no job of it runs, (\d+) wait", log)
    assert held is not None
    disk_full = "the scheduler's disk is full (No space left on device); have room "
    assert_recovered_once(jobs, kept=2, held=int(held.group(1)), why=disk_full)
