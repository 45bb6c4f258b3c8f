"""A client killed with SIGKILL whose node keeps its results for a while: a job
still running when that time is over is terminated with its computation.

Before, the node's keeper gave up waiting for the jobs after the keep time and
asked the computation to close with termination, which did nothing (a close was
already under way): a job of a client gone for good ran on to its end, days for a
long job or for ever for a hung one, on a CPU nobody could use, its result thrown
away. A real node from the command line, a real client process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.jobs import wait_for_path, wait_until
from tests.nodeproc import node_env, running_node

pytestmark = pytest.mark.slow

#: Seconds the node keeps the client's results (the client's RECOVERY_KEEP, an
#: hour by default: shortened in the client, as nothing else sets it).
KEEP = 2.0

#: ``NODE SECRET JOURNAL PIDFILE``: one job that runs for a minute, then sleep.
CLIENT = f"""
import sys, time
import dispynb
import dispynb.backends.nodes

dispynb.backends.nodes.RECOVERY_KEEP = {KEEP}
from tests.chaos.test_orphaned_jobs import record_pid_and_run

node, secret, journal, pidfile = sys.argv[1:5]
cluster = dispynb.JobCluster(
    record_pid_and_run, nodes=[node], secret=secret, recover_file=journal
)
cluster.submit(pidfile)
time.sleep(60)  # killed before this ends
"""


def record_pid_and_run(pidfile: str) -> int:
    """Write this worker's pid to ``pidfile``, then run for a minute."""
    import os
    import time

    with open(f"{pidfile}.tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(f"{pidfile}.tmp", pidfile)
    time.sleep(60)
    return 0


@pytest.mark.timeout(60)
def test_a_gone_clients_job_is_terminated_once_its_results_could_not_be_kept(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "pid"
    with running_node(tmp_path / "node") as node:
        argv = [
            sys.executable, "-c", CLIENT, node.spec, node.secret,
            str(tmp_path / "journal"), str(pidfile),
        ]  # fmt: skip
        client = subprocess.Popen(argv, env=node_env(), cwd=tmp_path)
        try:
            wait_for_path(pidfile, timeout=30)
        finally:
            client.kill()
            client.wait()
        worker = psutil.Process(int(pidfile.read_text()))
        wait_until(lambda: "results kept 2 s" in node.log_text(), timeout=10)
        # KEEP s, a few more for the computation to stop: not the job's minute.
        wait_until(
            lambda: not worker.is_running() or worker.status() == "zombie",
            timeout=KEEP + 15,
        )
        assert "the jobs still running are terminated" in node.log_text()
