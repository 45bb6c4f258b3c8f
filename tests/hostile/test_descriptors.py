"""A node at its file descriptor limit (``prlimit --nofile=64``) serving many clients.

Each client's computation costs the node a control socket and a socket per worker;
at the limit the kernel drops the worker sockets a computation process passes, and
the node's reads of ``/proc`` fail. Real ``dispynb-node`` under ``prlimit``, real
clients (clusters of this process), every wait bounded.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from dispynb import DispyJob, DispyNodeAvailInfo, JobCluster
from dispynb.errors import SetupError
from tests.hostile.tools import (
    count_lines,
    cpu_percent,
    limited_node,
    lowest_free_descriptor,
    wait_for,
)
from tests.nodeproc import ROOT, node_env, start_node

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


NODES = 12

#: A client that takes every descriptor but ``ROOM`` (as other files and sockets of
#: its program would), sets a cluster up on all the nodes, waits, then frees them.
CLIENT = """
import json, os, sys, time
import dispynb as dispy

def square(n):
    return n * n

secret, specs, room = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
ballast = []
while True:
    try:
        ballast.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
for _ in range(room):
    os.close(ballast.pop())
cluster = dispy.JobCluster(square, nodes=specs, secret=secret)
first = len(cluster.status().nodes)
cpu = time.process_time()
time.sleep(3)  # the nodes it could not connect wait: no busy loop meanwhile
cpu = time.process_time() - cpu
stuck = len(cluster.status().nodes)
for fd in ballast:
    os.close(fd)
deadline = time.monotonic() + 30
while len(cluster.status().nodes) < len(specs) and time.monotonic() < deadline:
    time.sleep(0.1)
jobs = [cluster.submit(n) for n in range(4 * len(specs))]
right = sum(1 for n, job in enumerate(jobs) if job() == n * n)
print(json.dumps([first, stuck, len(cluster.status().nodes), cpu, right]))
cluster.close()
"""


@pytest.mark.attack(
    id="client-nofile",
    title=f"A client whose program holds all its descriptors but 8 sets a cluster up "
    f"on {NODES} nodes, then frees them",
    goal="the nodes it cannot connect are said to wait for descriptors (not 'is "
    "dispynb-node running there?'), one warning each; no busy loop; all join once "
    "descriptors free (was: dropped for good)",
)
@pytest.mark.timeout(180)
def test_a_client_out_of_descriptors_connects_its_nodes_once_they_free(
    tmp_path, measure
):
    secret = "s" * 32
    nodes = []
    try:
        for index in range(NODES):
            nodes.append(
                start_node(tmp_path / str(index), secret=secret, name=f"n{index}")
            )
        done = subprocess.run(
            [sys.executable, "-c", CLIENT, secret, ",".join(n.spec for n in nodes),
             "8"],
            capture_output=True, text=True, cwd=ROOT, env=node_env(), timeout=150,
        )  # fmt: skip
    finally:
        for node in nodes:
            node.stop()
    assert done.returncode == 0, done.stderr
    first, stuck, joined, cpu, right = json.loads(done.stdout)
    waiting = done.stderr.count("out of file descriptors")
    measure(
        f"{first} node(s) at first, {stuck} after 3 s (client CPU {cpu:.2f} s "
        f"meanwhile), {joined} once freed, {right}/{4 * NODES} jobs right; "
        f"{waiting} warning(s)"
    )
    assert 1 <= stuck < NODES
    assert cpu < 0.5
    assert joined == NODES and right == 4 * NODES
    assert 1 <= waiting <= NODES - first, done.stderr
    assert "is dispynb-node running there" not in done.stderr


def _avail(cluster: JobCluster) -> DispyNodeAvailInfo | None:
    return cluster.status().nodes[0].avail_info


@pytest.mark.attack(
    id="node-nofile-load",
    title="A node's descriptors all taken (prlimit(2) on it: its soft limit at its "
    "lowest free descriptor) while a client's cluster is on it",
    goal="its pulses say its load is unknown (avail_info None), not 0% CPU free "
    "and no memory (a full node); the figures back once descriptors free",
)
def test_a_node_out_of_descriptors_reports_its_load_unknown(tmp_path, measure):
    with (
        limited_node(tmp_path / "node") as node,
        JobCluster(
            length, nodes=[node.spec], secret=node.secret, pulse_interval=0.2
        ) as cluster,
    ):
        assert cluster.submit(b"up")() == 2
        pid = node.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        before = _avail(cluster)
        assert before is not None and before.memory > 0
        resource.prlimit(
            pid, resource.RLIMIT_NOFILE, (lowest_free_descriptor(pid), hard)
        )
        try:
            # The first pulse after: unknown, or (as before) zeros.
            wait_for(
                lambda: (info := _avail(cluster)) is None or info.memory == 0,
                "a pulse from the squeezed node",
            )
            squeezed = _avail(cluster)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        wait_for(
            lambda: (info := _avail(cluster)) is not None and info.memory > 0,
            "the figures back",
        )
        after = _avail(cluster)
    measure(f"while squeezed: {squeezed!r}; once freed: {after!r}")
    assert squeezed is None
    assert after is not None and after.memory > 0
