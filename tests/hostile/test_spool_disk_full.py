"""The disk of a node's kept-results spool fills while the results of a client
that was killed keep coming: every one of them failed to be written, and each
logged a warning of its own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile.tools import wait_for
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

#: Jobs of the killed client, all running at once, and each result's size: 24
#: results of 500 kB for a spool on a 4 MiB tmpfs.
JOBS = 24
RESULT = 500_000

CLIENT = f"""
import sys, time
from dispynb import DispyJob, JobCluster

def result(n, go):
    import os, time
    deadline = time.monotonic() + 60  # ends once its client is gone: kept
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return bytes([n]) * {RESULT}

cluster = JobCluster(
    result, nodes=[sys.argv[1]], secret=sys.argv[2], recover_file=sys.argv[3]
)
jobs = [cluster.submit(i, sys.argv[4]) for i in range({JOBS})]
while sum(job.status == DispyJob.Running for job in jobs) < {JOBS}:
    time.sleep(0.02)
print("running", flush=True)
sys.stdin.read()  # killed here
"""


@pytest.mark.attack(
    id="spool-disk-full-log",
    title="A client is killed while its 24 jobs run; their results (500 kB each) "
    "fill the node's spool disk (a 4 MiB tmpfs)",
    goal="one warning for the results that cannot be spooled, and one line with "
    "their count when the node stops (was: a warning each)",
)
@pytest.mark.timeout(120)
def test_results_a_full_spool_disk_refuses_are_logged_once(tmp_path: Path, measure):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs in a mount namespace needs root and unshare")
    dest = tmp_path / "node" / "dest"
    dest.mkdir(parents=True)
    mount = f'mount -t tmpfs -o size=4m tmpfs "{dest}" && exec "$@"'
    launcher = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"]
    with running_node(tmp_path / "node", launcher=launcher, cpus=JOBS) as node:
        with subprocess.Popen(
            [sys.executable, "-c", CLIENT, node.spec, node.secret,
             str(tmp_path / "recover.db"), str(tmp_path / "go")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ) as client:  # fmt: skip
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "running"
            client.kill()
        # Its jobs end once the node keeps their results for nobody (they slept
        # 2 s: a node slower than that to see the client go sent them on).
        wait_for(
            lambda: "gone: its jobs go on" in node.log_text(),
            "the node to see its client gone",
            timeout=30,
        )
        (tmp_path / "go").touch()
        # Then the node's stop drains the jobs: every result is in by its end.
        wait_for(
            lambda: "cannot spool a kept result" in node.log_text(),
            "the spool's disk to fill",
            timeout=30,
        )
    log = node.log_text()
    warnings = [ln for ln in log.splitlines() if "cannot spool a kept result" in ln]
    counted = re.findall(r"(\d+) results? of computation result could not be", log)
    measure(
        f"{len(warnings)} warning(s) about results not spooled; counted at the "
        f"node's stop: {counted}"
    )
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert len(counted) == 1 and 0 < int(counted[0]) < JOBS
