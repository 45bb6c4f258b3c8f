"""`SSHNodes.adapt` against real ``sshd`` servers on namespace hosts h1-h3, with the
client program on h4: a burst of jobs grows the nodes from the minimum to the
maximum, an idle period shrinks them back, and a node drained while its long job runs
finishes that job before it stops.

The scale-up and scale-down times are measured and printed (``-s`` shows them), never
asserted: they are reported in the docs (Deploying nodes, adaptive scaling).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.multihost import sshd
from tests.multihost.launched import (
    adapt_client,
    check_adapted,
    host_python,
    node_pids,
)
from tests.multihost.netns import Host, Network, start_client
from tests.nodeproc import ROOT

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(240)]


CLIENT = adapt_client(
    """
from dispynb.deploy import SSHNodes


def make_nodes(args):
    return SSHNodes(
        args["hosts"],
        python=sys.executable,
        env={"PYTHONPATH": args["root"]},
        ssh_options=["-F", args["config"]],
        node_args=["--cpus", "1"],
        start=False,
    )
"""
)


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
    check_adapted(out, client.stderr, "SSH")
    assert out["hosts_up"] == sorted(hosts)  # one node per host
    assert "drain node" in client.stderr
    for host in node_hosts:
        assert node_pids(host) == []


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
    python = host_python(tmp_path)
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
    assert out["closed"] == "dispynb: ssh nodes stopped\n"
    for host in node_hosts:
        assert node_pids(host) == []
