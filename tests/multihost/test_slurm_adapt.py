"""`SlurmNodes.adapt` against a real SLURM (munged, slurmctld on h4 with the client
program, three slurmd on h1-h3): the same scenario as over SSH
(tests/multihost/test_ssh_adapt.py): a burst grows the batch jobs from the minimum to
the maximum, an idle period shrinks them back (``scancel`` after the drain), and a node
drained while its long job runs finishes that job before it is cancelled.

The scale-up and scale-down times are printed (``-s``), never asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost import slurm
from tests.multihost.netns import Network, start_client, wait_for
from tests.multihost.test_slurm import node_pids

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def slurm_env(
    network: Network, monkeypatch: pytest.MonkeyPatch
) -> Iterator[slurm.SlurmSetup]:
    reason = slurm.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm.slurm_cluster(network, network.hosts[-1], network.hosts[:-1]) as setup:
        monkeypatch.setenv("SLURM_CONF", str(setup.config))  # the client inherits it
        yield setup


CLIENT = """
import logging
import os
import sys
import time

import dispynb
from dispynb.deploy import SlurmNodes

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(created)f %(name)s %(levelname)s %(message)s")


def hold(release, x):
    # Runs until the file `release` exists (the test's clock, not a sleep).
    import os, time
    while not os.path.exists(release):
        time.sleep(0.02)
    return x * 10, dispy_node_name


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def events(nodes, action):
    return [e for e in nodes.events if e.action == action]


def main(args):
    nodes = SlurmNodes(
        0, cpus=1, walltime="10", partition="debug", log_directory=args["logs"]
    )
    out = {}
    with nodes:
        nodes.adapt(minimum=1, maximum=3, idle_timeout=2.0, interval=0.2, cooldown=1.0)
        cluster = dispynb.JobCluster(hold, nodes=nodes)
        size = lambda: len(cluster.status().nodes)
        out["start"] = size()
        # -- a burst: 6 jobs for 1 CPU per node -> 3 nodes (the maximum)
        first = args["dir"] + "/release-1"
        t0 = time.time()
        jobs = [cluster.submit(first, i) for i in range(6)]
        wait_until(lambda: size() == 3, 120, "grown to 3 nodes")
        out["up_s"] = time.time() - t0
        out["launched_in_burst"] = len(events(nodes, "launch")) - 1
        open(first, "w").close()
        results = [job() for job in jobs]
        out["results"] = [r[0] for r in results]
        out["ran_on"] = len({r[1] for r in results})
        t1 = max(job.end_time for job in jobs)
        # -- idle: back to the minimum (idle_timeout, then drain and stop)
        wait_until(lambda: len(events(nodes, "stopped")) == 2, 120, "shrunk to 1")
        out["down_s"] = events(nodes, "stopped")[-1].time - t1
        out["after_idle"] = size()
        out["most_active"] = max_active(nodes)
        # -- a long job on a node chosen for removal: 2 nodes, a long job each,
        # then the maximum lowered to 1
        nodes.adapt(minimum=2, maximum=2, idle_timeout=2.0, interval=0.2)
        wait_until(lambda: size() == 2, 120, "grown to 2 for the long jobs")
        second = args["dir"] + "/release-2"
        long_jobs = [cluster.submit(second, i) for i in range(2)]
        wait_until(lambda: all(j.status == dispynb.DispyJob.Running
                               for j in long_jobs), 60, "long jobs running")
        nodes.adapt(minimum=1, maximum=1, idle_timeout=2.0, interval=0.2)
        wait_until(lambda: len(events(nodes, "drain")) == 3, 30, "a busy node drained")
        drained = events(nodes, "drain")[-1]
        out["drain_why"] = drained.detail
        time.sleep(0.5)  # a drained node with a running job must not stop: look
        out["stopped_while_running"] = len(events(nodes, "stopped")) > 2
        open(second, "w").close()
        long_results = [job() for job in long_jobs]
        out["long_results"] = [r[0] for r in long_results]
        out["long_status"] = [job.status.name for job in long_jobs]
        on_drained = [
            j for j, r in zip(long_jobs, long_results) if r[1] == drained.node
        ]
        out["on_drained"] = len(on_drained)
        wait_until(lambda: len(events(nodes, "stopped")) == 3, 60, "drained stopped")
        stopped = events(nodes, "stopped")[-1]
        out["stopped_node"] = stopped.node == drained.node
        out["stopped_after_job"] = stopped.time >= on_drained[0].end_time
        cluster.close()
    out["exited"] = nodes.exited()
    return out


def max_active(nodes):
    # The most nodes running at once, replayed from the events.
    count = best = 0
    for e in nodes.events:
        count += {"launch": 1, "stopped": -1}.get(e.action, 0)
        best = max(best, count)
    return best
"""


def test_slurm_nodes_adapt_to_a_burst_and_an_idle_period(
    network: Network, slurm_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    args = {"dir": str(tmp_path), "logs": str(logs)}
    client = start_client(network, network.hosts[-1], tmp_path, CLIENT, args)
    try:
        out = client.result(260)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{slurm_env.logs()}") from None
    finally:
        client.stop()
    print(
        f"\nadapt over SLURM: scale-up 1 -> 3 nodes in {out['up_s']:.2f} s after the "
        f"burst; scale-down 3 -> 1 in {out['down_s']:.2f} s after the last job "
        "(idle_timeout 2 s included)"
    )
    assert out["start"] == 1  # the minimum
    assert out["launched_in_burst"] == 2 and out["most_active"] == 3  # the maximum
    assert out["results"] == [i * 10 for i in range(6)]
    assert out["ran_on"] == 3
    assert out["after_idle"] == 1
    # The long jobs: the busy node drained finished its job, then was cancelled.
    assert out["drain_why"] == "over the maximum of 1"
    assert out["stopped_while_running"] is False
    assert out["long_results"] == [0, 10]
    assert out["long_status"] == ["Finished", "Finished"]
    assert out["on_drained"] == 1
    assert out["stopped_node"] and out["stopped_after_job"]
    assert out["exited"] == []
    assert "adapt: 1 to 3 nodes" in client.stderr
    for host in network.hosts[:-1]:
        wait_for(lambda host=host: node_pids(host) == [], 30, f"no node on {host.ip}")
