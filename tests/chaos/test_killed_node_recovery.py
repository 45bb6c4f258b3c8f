"""A client killed, then its node (a batch system ending their job, a machine's
power cut), the node started again: ``recover_jobs`` says the job that
was running there was lost with the node, not that it never reached it, and the
node's log says what it keeps and why.

Real node from the command line (restarted on its port, as a service manager
does), a real client killed with SIGKILL, and ``recover_jobs`` in a new process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb import DispyJob
from tests.api.crashclient import killed_after, start_client
from tests.jobs import WAIT, wait_until
from tests.nodeproc import start_node

pytestmark = pytest.mark.slow

CLIENT = """
import sys, time
import dispynb as dispy

def compute(n, marks):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()  # the node has the job
    if n:
        time.sleep(60)  # still running when the node is killed
    return n

cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]], secret=sys.argv[2],
                           recover_file=sys.argv[3])
first = cluster.submit_job_id("quick", 0, sys.argv[4])
assert first() == 0  # journaled: the node keeps nothing of it
cluster.submit_job_id("long", 1, sys.argv[4])
print("submitted", flush=True)
time.sleep(120)  # killed before it gets further
"""

RECOVER = """
import json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(sys.argv[1], timeout=30, secret=sys.argv[2])
print(json.dumps([[j.id, int(j.status), j.exception] for j in jobs]))
"""


def test_a_job_running_when_its_node_was_killed_is_said_lost_with_it(tmp_path: Path):
    marks = tmp_path / "marks"
    marks.mkdir()
    journal = tmp_path / "journal.db"
    node = start_node(tmp_path / "node", cpus=2)
    try:
        client = start_client(
            tmp_path, CLIENT, node.spec, node.secret, str(journal), str(marks)
        )
        with killed_after(client):
            wait_until(lambda: (marks / "1").exists())
        # The node next, before it noticed (the jobs of a client gone go on).
        node.proc.send_signal(signal.SIGKILL)  # its computation follows it
        node.proc.wait(WAIT)
        (tmp_path / "node" / "port").unlink()
        node = start_node(
            tmp_path / "node", "--port", str(node.port), cpus=2, secret=node.secret
        )
        (tmp_path / "recover.py").write_text(RECOVER)
        done = subprocess.run(
            [sys.executable, "recover.py", str(journal), node.secret],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path.cwd())},
        )
        log = node.log_text()
    finally:
        node.stop()
    assert done.returncode == 0, done.stderr
    jobs = {
        job_id: (status, reason) for job_id, status, reason in json.loads(done.stdout)
    }
    assert jobs["quick"][0] == DispyJob.Finished
    status, reason = jobs["long"]
    assert status == DispyJob.Abandoned
    # Before: "the job never reached node 127.0.0.1:PORT: it did not run".
    assert "never reached" not in reason, reason
    assert f"node {node.spec} was killed" in reason, reason
    assert "lost with it" in reason, reason
    # Before: "computation compute: 0 kept results offered to its client until ...".
    assert "0 kept results" not in log, log
    assert "compute (its node was killed while it ran): no result kept" in log, log
