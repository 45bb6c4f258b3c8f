"""A node's batch job that SLURM requeues (``scontrol requeue``; preemption with
``PreemptMode=REQUEUE`` and a failed compute node do the same): SLURM stops the
node, so the launcher no longer lists it nor hands it to a cluster, and says why;
when SLURM runs the job again its new node registers and the cluster uses it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.multihost import slurm
from tests.multihost.netns import Client, Network, start_client
from tests.multihost.test_slurm import cluster_env, slurm_setup

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(240)]

__all__ = ["cluster_env", "slurm_setup"]

REQUEUE_CLIENT = """
import json
import logging
import os
import sys
import time

import dispynb
from dispynb.deploy import SlurmNodes

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(name)s %(levelname)s %(message)s")


def where(x):
    import time
    time.sleep(x)
    return dispy_node_name


def wait(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def main(args):
    nodes = SlurmNodes(2, cpus=1, walltime="10", log_directory=args["logs"])
    with nodes:
        nodes.wait_for(2, 60)
        cluster = dispynb.JobCluster(where, nodes=nodes, reentrant=True)
        doomed = cluster.submit(20)
        wait("the job running", lambda: doomed.status == dispynb.DispyJob.Running, 30)
        name = next(n.name for n in nodes.nodes if n.host == doomed.ip_addr)
        job = next(j for j in nodes.jobs if j.name == name)
        with open(args["ready"], "w") as out:
            json.dump({"job": job.job_id, "node": name}, out)
        # the test requeues the job: SLURM stops the node and queues the job again
        wait("the node gone", lambda: name not in [n.name for n in nodes.nodes], 60)
        gone = {"state": job.state, "nodes": len(nodes.nodes),
                "specs": nodes.node_specs(), "exited": nodes.exited(),
                "events": [[e.action, e.node, e.detail] for e in nodes.events]}
        with open(args["gone"], "w") as out:
            json.dump(gone, out)
        # the test lets SLURM run it again now: a new node registers
        wait("the node back", lambda: name in [n.name for n in nodes.nodes], 90)
        moved = doomed()
        placed = [cluster.submit(1.5) for _ in range(4)]
        names = sorted({j() for j in placed})
        cluster.close()
    return {"gone": gone, "doomed": name, "moved": moved, "names": names}
"""


def _wait_file(path: Path, client: Client, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("}")):
        if client.proc.poll() is not None or time.monotonic() > deadline:
            client.result(1)  # raises, with what the client printed
        time.sleep(0.05)
    data: dict[str, object] = json.loads(path.read_text())
    return data


def test_a_requeued_job_leaves_the_nodes_and_its_next_run_registers(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    def scontrol(*args: str) -> None:
        done = slurm.slurm_command(
            network, network.hosts[-1], cluster_env, "scontrol", *args
        )
        assert done.returncode == 0, done.stderr

    ready, gone = tmp_path / "ready.json", tmp_path / "gone.json"
    client = start_client(
        network, network.hosts[-1], tmp_path, REQUEUE_CLIENT,
        {"ready": str(ready), "gone": str(gone), "logs": str(tmp_path)},
    )  # fmt: skip
    try:
        job = str(_wait_file(ready, client, 90)["job"])
        scontrol("requeue", job)
        _wait_file(gone, client, 70)
        scontrol("update", f"JobId={job}", "StartTime=now")  # no requeue delay
        result = client.result(150)
    finally:
        client.stop()
    doomed, left = result["doomed"], result["gone"]
    assert left["nodes"] == 1 and len(left["specs"]) == 1, left
    assert left["state"] in ("PENDING", "REQUEUED"), left
    assert left["exited"] == [], left  # requeued, not ended
    assert ["requeued", doomed] == left["events"][-1][:2], left["events"]
    assert f"SLURM job {job} requeued" in left["events"][-1][2]
    assert f"node {doomed} left: SLURM job {job} requeued" in client.stderr
    assert result["moved"] != doomed  # reentrant: ran on the other node
    assert doomed in result["names"] and len(result["names"]) == 2, result
