"""`dispynb.deploy.SSHNodes` against real ``sshd`` servers on namespace hosts h1, h2,
with the client program on h4: nodes started over SSH register, run jobs, log their
output to the client, and stop when the client closes them or dies."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost import sshd
from tests.multihost.launched import node_pids
from tests.multihost.netns import Host, Network, start_client, wait_for
from tests.nodeproc import ROOT

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def ssh_setup(
    network: Network, node_hosts: list[Host], tmp_path: Path
) -> Iterator[sshd.SSHSetup]:
    reason = sshd.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with sshd.sshd_servers(network, node_hosts[:2], tmp_path / "ssh") as setup:
        yield setup


CLIENT = """
import json
import logging
import os
import sys
import time

import dispynb
from dispynb.deploy import SSHNodes

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(name)s %(levelname)s %(message)s")


def where(x):
    import socket, time
    time.sleep(0.2)
    return x * x, os.getpid()


def main(args):
    nodes = SSHNodes(
        args["hosts"],
        python=sys.executable,
        env={"PYTHONPATH": args["root"]},
        ssh_options=["-F", args["config"]],
        node_args=["--cpus", "2"],
    )
    with nodes:
        cluster = dispynb.JobCluster(where, nodes=nodes)
        jobs = [cluster.submit(i) for i in range(8)]
        results = [job() for job in jobs]
        ips = sorted({job.ip_addr for job in jobs})
        registered = sorted(n.host for n in nodes.nodes)
        if args.get("ready"):
            with open(args["ready"], "w") as out:
                json.dump(registered, out)
            time.sleep(600)  # killed by the test
        cluster.close()
    return {"squares": [r[0] for r in results], "ips": ips, "registered": registered}
"""


def test_ssh_nodes_run_jobs_and_stop_on_close(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    ssh_setup: sshd.SSHSetup,
    tmp_path: Path,
) -> None:
    hosts = [h.ip for h in node_hosts[:2]]
    args = {"hosts": hosts, "root": str(ROOT), "config": str(ssh_setup.config)}
    client = start_client(network, client_host, tmp_path, CLIENT, args)
    try:
        result = client.result(90)
    finally:
        client.stop()
    assert result["squares"] == [i * i for i in range(8)]
    assert result["registered"] == hosts
    assert result["ips"] == hosts
    # The nodes' output reached the client's log, prefixed with their names.
    assert "dispynb.deploy.ssh INFO [ssh-0-" in client.stderr
    assert "registered with the client at" in client.stderr
    # The secret was on no command line (the ssh command is logged in full).
    assert "--secret-stdin" in client.stderr
    # close() stopped them.
    for host in node_hosts[:2]:
        assert node_pids(host) == []


def test_ssh_nodes_stop_when_the_client_is_killed(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    ssh_setup: sshd.SSHSetup,
    tmp_path: Path,
) -> None:
    hosts = [h.ip for h in node_hosts[:2]]
    ready = tmp_path / "ready.json"
    args = {
        "hosts": hosts,
        "root": str(ROOT),
        "config": str(ssh_setup.config),
        "ready": str(ready),
    }
    client = start_client(network, client_host, tmp_path, CLIENT, args)
    try:
        wait_for(ready.exists, 90, "the client's nodes registered")
        wait_for(lambda: ready.read_text().endswith("]"), 5, "ready file written")
        assert json.loads(ready.read_text()) == hosts
        for host in node_hosts[:2]:
            assert len(node_pids(host)) >= 1
        os.kill(client.proc.pid, signal.SIGKILL)  # no clean-up code runs
        client.proc.communicate(timeout=10)
        for host in node_hosts[:2]:
            wait_for(
                lambda host=host: node_pids(host) == [],
                30,
                f"the node on {host.ip} stopped after its client died",
            )
    finally:
        client.stop()


MAGIC_CLIENT = """
import sys

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

WHERE = "def where(x):\\n    return dispy_node_name\\n"


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
            f"--ssh-config {args['config']}",
        )
    with capture_output():
        shell.run_cell_magic("dispy", '--over "range(6)" --into placed', WHERE)
    names = shell.user_ns["placed"].results
    with capture_output():
        shell.run_line_magic("dispy", "close")
    return {"started": started.stdout, "names": names}
"""


def test_dispy_ssh_magic(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    ssh_setup: sshd.SSHSetup,
    tmp_path: Path,
) -> None:
    """``%dispy ssh HOST ...`` in an IPython shell, then a ``%%dispy`` cell."""
    hosts = [h.ip for h in node_hosts[:2]]
    python = tmp_path / "python"  # the hosts' Python: this one, with the repo
    python.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    args = {"hosts": hosts, "python": str(python), "config": str(ssh_setup.config)}
    client = start_client(network, client_host, tmp_path, MAGIC_CLIENT, args)
    try:
        result = client.result(90)
    finally:
        client.stop()
    assert result["started"].startswith("dispynb: ssh nodes ")
    for ip in hosts:
        assert ip in result["started"]
    names = result["names"]
    assert len(names) == 6 and all(name.startswith("ssh-") for name in names)
    for host in node_hosts[:2]:
        assert node_pids(host) == []
