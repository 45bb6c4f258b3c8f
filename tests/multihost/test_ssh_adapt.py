"""`SSHNodes.adapt` against real ``sshd`` servers on namespace hosts h1-h3, with the
client program on h4: a burst of jobs grows the nodes from the minimum to the
maximum, an idle period shrinks them back, and a node drained while its long job runs
finishes that job before it stops.

The scale-up and scale-down times are measured and printed (``-s`` shows them), never
asserted: they are reported in the docs (Deploying nodes, adaptive scaling).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost import sshd
from tests.multihost.netns import Host, Network, start_client
from tests.multihost.test_ssh import node_pids
from tests.nodeproc import ROOT

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def ssh3(
    network: Network, node_hosts: list[Host], tmp_path: Path
) -> Iterator[sshd.SSHSetup]:
    reason = sshd.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with sshd.sshd_servers(network, node_hosts, tmp_path / "ssh") as setup:
        yield setup


CLIENT = """
import logging
import os
import sys
import time

import dispynb
from dispynb.deploy import SSHNodes

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
    nodes = SSHNodes(
        args["hosts"],
        python=sys.executable,
        env={"PYTHONPATH": args["root"]},
        ssh_options=["-F", args["config"]],
        node_args=["--cpus", "1"],
        start=False,
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
        out["hosts_up"] = sorted(n.host for n in nodes.nodes)
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


def test_ssh_nodes_adapt_to_a_burst_and_an_idle_period(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    ssh3: sshd.SSHSetup,
    tmp_path: Path,
) -> None:
    hosts = [h.ip for h in node_hosts]
    args = {
        "hosts": hosts,
        "root": str(ROOT),
        "config": str(ssh3.config),
        "dir": str(tmp_path),
    }
    client = start_client(network, client_host, tmp_path, CLIENT, args)
    try:
        out = client.result(200)
    finally:
        client.stop()
    print(
        f"\nadapt over SSH: scale-up 1 -> 3 nodes in {out['up_s']:.2f} s after the "
        f"burst; scale-down 3 -> 1 in {out['down_s']:.2f} s after the last job "
        "(idle_timeout 2 s included)"
    )
    assert out["start"] == 1  # the minimum
    assert out["launched_in_burst"] == 2 and out["most_active"] == 3  # the maximum
    assert out["hosts_up"] == sorted(hosts)  # one node per host
    assert out["results"] == [i * 10 for i in range(6)]
    assert out["ran_on"] == 3
    assert out["after_idle"] == 1
    # The long jobs: the busy node drained finished its job, then stopped.
    assert out["drain_why"] == "over the maximum of 1"
    assert out["stopped_while_running"] is False
    assert out["long_results"] == [0, 10]
    assert out["long_status"] == ["Finished", "Finished"]
    assert out["on_drained"] == 1
    assert out["stopped_node"] and out["stopped_after_job"]
    assert out["exited"] == []
    assert "adapt: 1 to 3 nodes" in client.stderr
    assert "drain node" in client.stderr
    for host in node_hosts:
        assert node_pids(network, host) == []


MAGIC_CLIENT = """
import time

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

SLOW = "def slow(x):\\n    import time\\n    time.sleep(1)\\n    return x\\n"


def main(args):
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    hosts = " ".join(args["hosts"])
    with capture_output() as started:
        shell.run_line_magic(
            "dispy",
            f"ssh {hosts} --cpus 1 --python {args['python']} "
            f"--ssh-config {args['config']} --adapt 1:3 --idle-timeout 1",
        )
    nodes = shell.magics_manager.registry["DispyMagics"].session.local
    at_start = [e.action for e in nodes.events].count("launch")
    with capture_output():
        shell.run_cell_magic("dispy", '--over "range(6)" --into run', SLOW)
    launched = [e.action for e in nodes.events].count("launch")
    deadline = time.monotonic() + 60
    while [e.action for e in nodes.events].count("stopped") < launched - 1:
        assert time.monotonic() < deadline, list(nodes.events)
        time.sleep(0.05)
    left = len(nodes.nodes)
    with capture_output() as closed:
        shell.run_line_magic("dispy", "close")
    return {"started": started.stdout, "at_start": at_start, "launched": launched,
            "results": shell.user_ns["run"].results, "left": left,
            "closed": closed.stdout}
"""


def test_dispy_ssh_magic_adapts(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    ssh3: sshd.SSHSetup,
    tmp_path: Path,
) -> None:
    """``%dispy ssh HOST... --adapt 1:3``: one node at first, more for a run's jobs
    (one per look while jobs wait, up to 3), back to one when idle."""
    python = tmp_path / "python"  # the hosts' Python: this one, with the repo
    python.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    args = {
        "hosts": [h.ip for h in node_hosts],
        "python": str(python),
        "config": str(ssh3.config),
    }
    client = start_client(network, client_host, tmp_path, MAGIC_CLIENT, args)
    try:
        out = client.result(150)
    finally:
        client.stop()
    assert out["started"].startswith("dispynb: ssh nodes ")
    assert out["at_start"] == 1  # the minimum, not one per host
    assert out["launched"] == 3  # 6 jobs for 1 CPU each: the maximum
    assert out["results"] == list(range(6))
    assert out["left"] == 1
    assert out["closed"] == "dispynb: runs cancelled and closed, ssh nodes stopped\n"
    for host in node_hosts:
        assert node_pids(network, host) == []
