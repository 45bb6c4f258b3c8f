"""A client stopped (SIGSTOP: a paused kernel, a process under a debugger, a link that
stalls) while its jobs return large results, and another client of the same node.

The node stops reading the stopped client's workers once 32 MiB wait for it (test_
backpressure.py): its jobs then block on what they return. Their CPUs must not be
held as long as it is stopped: the other client's jobs run meanwhile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dispynb import DispyJob, JobCluster
from tests import jobs
from tests.hostile.tools import limited_node, wait_for
from tests.nodeproc import CliNode, node_env

pytestmark = pytest.mark.slow

STOPPED = """
import sys
from dispynb import JobCluster

def big(n):
    return bytes(20 << 20)

cluster = JobCluster(big, nodes=[sys.argv[1]], secret=sys.argv[2])
jobs = [cluster.submit(i) for i in range(20)]
jobs[0]()  # its jobs are all on the node by its first result
print("submitted", flush=True)
sys.stdin.read()  # stopped, then killed, here
"""


def _meanwhile(
    node: CliNode, stopped: subprocess.Popen[str]
) -> tuple[float, int, list[object]]:
    """Stop ``stopped`` once its jobs run; run 10 jobs of another client: how long
    it waited for them, how many finished, their results."""
    assert stopped.stdout is not None
    assert stopped.stdout.readline().strip() == "submitted"
    wait_for(lambda: "big of" in node.log_text(), "its computation", 30)
    os.kill(stopped.pid, signal.SIGSTOP)
    # Once 32 MiB wait for it (a 20 MiB result or two), the node holds its
    # workers: from then on, none of its jobs ends (before: no CPU was freed).
    wait_for(lambda: "holding its workers" in node.log_text(), "held workers", 30)
    start = time.monotonic()
    with JobCluster(jobs.square, nodes=[node.spec], secret=node.secret) as cluster:
        submitted = [cluster.submit(i) for i in range(10)]
        cluster.wait(timeout=30)
        took = time.monotonic() - start
        results = [job.result for job in submitted]
        done = sum(job.status == DispyJob.Finished for job in submitted)
        os.kill(stopped.pid, signal.SIGKILL)  # lets the cluster close
    return took, done, results


@pytest.mark.timeout(120)
@pytest.mark.attack(
    id="stopped-client-cpus",
    title="A client stopped (SIGSTOP) while its 20 jobs return 20 MiB each, on a node "
    "of 2 CPUs; another client submits 10 jobs meanwhile",
    goal="the other client's jobs all run while it is stopped (was: none ran until "
    "the stopped client was killed)",
)
def test_a_stopped_client_does_not_keep_the_nodes_cpus(measure, tmp_path):
    with (
        limited_node(tmp_path / "node", "--loglevel", "debug", cpus=2) as node,
        subprocess.Popen(
            [sys.executable, "-c", STOPPED, node.spec, node.secret],
            cwd=tmp_path,  # its recovery file goes there
            env=node_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as stopped,
    ):
        try:
            took, done, results = _meanwhile(node, stopped)
        finally:
            stopped.kill()
    measure(f"the other client's jobs: {done} of 10 finished in {took:.1f} s")
    assert results == [i * i for i in range(10)]
