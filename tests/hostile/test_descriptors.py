"""A node at its file descriptor limit (``prlimit --nofile=64``) serving many clients.

Each client's computation costs the node a control socket and a socket per worker;
at the limit the kernel drops the worker sockets a computation process passes, and
the node's reads of ``/proc`` fail. Real ``dispynb-node`` under ``prlimit``, real
clients (clusters of this process), every wait bounded.
"""

from __future__ import annotations

import os

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import SetupError
from tests.hostile.tools import count_lines, cpu_percent, limited_node

pytestmark = pytest.mark.slow

#: Clusters tried against the node: more than 64 descriptors hold.
CLUSTERS = 14


def length(data: bytes) -> int:
    return len(data)


@pytest.mark.attack(
    id="node-nofile",
    title=f"{CLUSTERS} clusters set up on a node under prlimit --nofile=64 (2 CPUs), "
    "each running a job with 2 MB of arguments",
    goal="the clusters that do not fit refused with a SetupError naming the limit and "
    "the fix, one warning; the others' jobs run; node CPU under 5%; no traceback; "
    "service back once they close (was: tracebacks, pulses stopped, clients declared "
    "the node dead, a half-started computation's process died)",
)
@pytest.mark.timeout(180)
def test_a_node_out_of_descriptors_refuses_computations_saying_so(tmp_path, measure):
    with limited_node(tmp_path / "node", nofile=64, cpus=2) as node:
        clusters: list[JobCluster] = []
        refusals: list[str] = []
        try:
            for _ in range(CLUSTERS):
                try:
                    clusters.append(
                        JobCluster(length, nodes=[node.spec], secret=node.secret)
                    )
                except SetupError as exc:
                    refusals.append(str(exc))
            payload = os.urandom(2_000_000)
            jobs = [cluster.submit(payload) for cluster in clusters]
            ran = sum(
                1
                for job in jobs
                if job() == len(payload) and job.status == DispyJob.Finished
            )
            cpu = cpu_percent(node.proc.pid, 2.0, children=True)
        finally:
            for cluster in clusters:
                cluster.close()
        with JobCluster(length, nodes=[node.spec], secret=node.secret) as cluster:
            after = cluster.submit(b"back")()
    log = node.log_text()
    warnings = count_lines(node.log, "WARNING.*refused computation")
    measure(
        f"{len(clusters)} set up and {ran} jobs run, {len(refusals)} refused "
        f"({refusals[0][:90] if refusals else '-'}...); {warnings} warning(s); node "
        f"CPU {cpu:.1f}% while they held; after they closed a new cluster's job "
        f"returned {after}"
    )
    assert clusters and refusals and len(clusters) + len(refusals) == CLUSTERS
    assert ran == len(clusters)
    assert all("file descriptors" in r and "ulimit -n" in r for r in refusals)
    assert warnings == 1
    assert cpu < 5
    assert after == 4
    assert "Traceback" not in log and " ERROR " not in log, log
