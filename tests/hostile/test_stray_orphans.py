"""What a job started that outlives its worker (the job killed its own worker):
the node ends it, and its log says what happened (was: "clone with
CLONE_PARENT", an attack this job did not make)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from tests.hostile.tools import wait_for
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


def fork_then_die(marker: str) -> None:
    """Fork a sleeper (noting its pid in ``marker``), then SIGKILL this worker."""
    import time

    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    with open(marker, "w") as handle:
        handle.write(str(child))
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroups", "no-cgroup"])
def test_a_child_that_outlives_its_killed_worker_is_logged_as_such(
    cgroups: bool, tmp_path: Path
) -> None:
    marker = str(tmp_path / "child")
    launcher = [] if cgroups else ["env", "DISPYNB_PIDS_CGROUP=off"]
    with running_node(tmp_path / "node", launcher=launcher) as node:
        with JobCluster(fork_then_die, nodes=[node.spec], secret=node.secret) as c:
            job = c.submit(marker)
            job()
            assert job.status != DispyJob.Finished
            child = int(Path(marker).read_text())
            try:
                wait_for(lambda: not _alive(child), "the worker's child ended")
                # Reaped (and logged) by the computation process, its subreaper.
                wait_for(lambda: f"process {child} " in node.log_text(), "its log")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        log = node.log_text()
    assert "CLONE_PARENT" not in log, log
    assert f"a job started process {child} that outlived its worker (process" in log
