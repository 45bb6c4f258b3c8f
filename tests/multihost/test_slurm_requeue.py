"""A node's batch job that SLURM requeues (``scontrol requeue``; preemption with
``PreemptMode=REQUEUE`` and a failed compute node do the same): SLURM stops the
node, so the launcher no longer lists it nor hands it to a cluster, and says why;
when SLURM runs the job again its new node registers and the cluster uses it. And
one that SLURM suspends, then resumes (``scontrol suspend`` / ``resume``)."""

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

#: What both client programs start with: a job that sleeps and says where it ran.
PREAMBLE = """
import json
import logging
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
"""

REQUEUE_CLIENT = (
    PREAMBLE
    + """

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
)


def scontrol(network: Network, setup: slurm.SlurmSetup, *args: str) -> None:
    """Run ``scontrol ARGS`` (as SLURM's administrator) on the controller's host."""
    done = slurm.slurm_command(network, network.hosts[-1], setup, "scontrol", *args)
    assert done.returncode == 0, done.stderr


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
    ready, gone = tmp_path / "ready.json", tmp_path / "gone.json"
    client = start_client(
        network, network.hosts[-1], tmp_path, REQUEUE_CLIENT,
        {"ready": str(ready), "gone": str(gone), "logs": str(tmp_path)},
    )  # fmt: skip
    try:
        job = str(_wait_file(ready, client, 90)["job"])
        scontrol(network, cluster_env, "requeue", job)
        _wait_file(gone, client, 70)
        scontrol(
            network, cluster_env, "update", f"JobId={job}", "StartTime=now"
        )  # no requeue delay
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


SUSPEND_CLIENT = (
    PREAMBLE
    + """

def said(nodes, action, name):
    return [e.detail for e in nodes.events if e.action == action and e.node == name]


def main(args):
    nodes = SlurmNodes(2, cpus=1, walltime="10", log_directory=args["logs"])
    with nodes:
        nodes.wait_for(2, 60)
        cluster = dispynb.JobCluster(where, nodes=nodes, reentrant=True)
        frozen = cluster.submit(10)
        wait("the job running", lambda: frozen.status == dispynb.DispyJob.Running, 30)
        name = next(n.name for n in nodes.nodes if n.host == frozen.ip_addr)
        job = next(j for j in nodes.jobs if j.name == name)
        with open(args["ready"], "w") as out:
            json.dump({"job": job.job_id, "node": name}, out)
        # the test suspends the job: SLURM stops the node's processes (SIGSTOP)
        wait("the suspension said", lambda: said(nodes, "suspended", name), 60)
        moved = frozen()  # reentrant: runs again on the other node
        held = {"state": job.state, "events": said(nodes, "suspended", name),
                "exited": nodes.exited()}
        with open(args["held"], "w") as out:
            json.dump(held, out)
        # the test resumes it: the node goes on, and the cluster uses it again
        wait("the resumption said", lambda: said(nodes, "resumed", name), 60)
        deadline = time.monotonic() + 60
        names = set()
        while name not in names and time.monotonic() < deadline:
            placed = [cluster.submit(0.5) for _ in range(4)]
            names |= {j() for j in placed}
        cluster.close()
    return {"held": held, "frozen": name, "moved": moved, "names": sorted(names),
            "resumed": said(nodes, "resumed", name)}
"""
)


def test_a_suspended_job_is_said_and_its_node_is_used_again_when_resumed(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    """``scontrol suspend`` (or gang scheduling, ``PreemptMode=SUSPEND``) stops
    every process of the node's batch job: the cluster finds the node silent and
    runs its reentrant job elsewhere, and the launcher says why (before: the node
    was only 'lost'); ``scontrol resume`` lets it go on and clusters use it again."""

    ready, held = tmp_path / "ready.json", tmp_path / "held.json"
    client = start_client(
        network, network.hosts[-1], tmp_path, SUSPEND_CLIENT,
        {"ready": str(ready), "held": str(held), "logs": str(tmp_path)},
    )  # fmt: skip
    try:
        job = str(_wait_file(ready, client, 90)["job"])
        scontrol(network, cluster_env, "suspend", job)
        _wait_file(held, client, 70)
        scontrol(network, cluster_env, "resume", job)
        result = client.result(150)
    finally:
        client.stop()
    frozen, during = result["frozen"], result["held"]
    assert during["state"] == "SUSPENDED", during
    assert during["exited"] == [], during  # suspended, not ended
    assert during["events"] == [f"SLURM job {job} SUSPENDED"], during
    assert f"node {frozen} suspended: SLURM job {job} SUSPENDED" in client.stderr
    assert result["moved"] != frozen  # reentrant: ran on the other node
    assert result["resumed"] == [f"SLURM job {job} RUNNING"], result
    assert frozen in result["names"], result  # used again once resumed
