"""dispy users' programs and node command lines, unchanged, across namespace hosts.

Nodes are started as ``dispynode`` is: no flags, the secret in ``DISPYNB_SECRET``.
Client programs are dispy's documented ones with only ``import dispy`` changed, and
do not name their nodes: discovery alone finds them.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb.defaults import NODE_PORT
from dispynb.wording import counted
from tests.multihost.conftest import Site, StartNode
from tests.multihost.netns import (
    Host,
    Network,
    run_client,
    start_client,
    start_node,
    wait_for,
)
from tests.nodeproc import node_env

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

#: dispy's canonical sample program (dispy.org), only ``import dispy`` changed and the
#: sleeps shortened.
DISPY_SAMPLE = """
# 'compute' is distributed to each node running 'dispynode'
def compute(n):
    import time, socket
    time.sleep(n)
    host = socket.gethostname()
    return (host, n)

if __name__ == '__main__':
    import dispynb as dispy, random
    cluster = dispy.JobCluster(compute)
    jobs = []
    for i in range(12):
        # schedule execution of 'compute' on a node (running 'dispynode')
        # with a parameter (random number in this case)
        job = cluster.submit(random.randint(1, 5) / 10)
        job.id = i # optionally associate an ID to job (if needed later)
        jobs.append(job)
    # cluster.wait() # waits for all scheduled jobs to finish
    for job in jobs:
        host, n = job() # waits for job to finish and returns results
        print('%s executed job %s at %s with %s' % (host, job.id, job.start_time, n))
        # other fields of 'job' that may be useful:
        # print(job.stdout, job.stderr, job.exception, job.ip_addr, job.start_time,
        #       job.end_time)
    cluster.print_status()
"""


def test_dispy_sample_finds_default_nodes_by_discovery_alone(site: Site) -> None:
    nodes = [site.start(host) for host in site.node_hosts]  # no flags at all
    for node in nodes:
        text = node.log_text()
        assert f"0.0.0.0:{NODE_PORT}" in text  # every address, as dispynode
        assert "answering pings on UDP *:" in text  # discovery on by default
    script = site.directory / "sample.py"
    script.write_text(DISPY_SAMPLE)
    env_secret = {"DISPYNB_SECRET": site.secret}
    proc = site.network.popen(
        site.client_host,
        [sys.executable, str(script)],
        cwd=site.directory,  # not the checkout: a failed run may leave a recovery file
        env={**node_env(), **env_secret},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"{out}\n{err}"
    lines = [line for line in out.splitlines() if " executed job " in line]
    assert [line.split()[3] for line in lines] == [str(i) for i in range(12)]
    assert {line.split()[0] for line in lines} <= {n.name for n in nodes}
    assert "no node found" not in err
    # The client found every node and authenticated to it, though it named none.
    for node in nodes:
        wait_for(
            lambda node=node: (
                f"connected from {site.client_host.ip}" in node.log_text()
            ),
            10,
            f"the client connecting to {node.name}",
        )


#: A dispy program without nodes; writes ``args["warned"]`` when dispynb warns that
#: it found no node, then goes on waiting for its jobs.
WAITING_CLIENT = """
import logging
import sys

import dispynb as dispy


class Flag(logging.Handler):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def emit(self, record):
        if "no node found" in record.getMessage():
            open(self.path, "w").close()


def compute(n):
    return [n * n, dispy_node_name]


def main(args):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger().addHandler(Flag(args["warned"]))
    cluster = dispy.JobCluster(compute)
    jobs = [cluster.submit(n) for n in range(4)]
    results = [job() for job in jobs]
    cluster.close()
    return results
"""


def test_client_warns_once_when_no_node_answers_and_keeps_waiting(site: Site) -> None:
    hidden = site.start(site.node_hosts[0], "--no-discovery")
    assert "answering pings" not in hidden.log_text()
    warned = site.directory / "warned"
    client = site.start_client(
        WAITING_CLIENT,
        {"warned": str(warned)},
        secret=site.secret,
    )
    try:
        wait_for(warned.exists, 30, "the client warning that it found no node")
        assert client.proc.poll() is None  # still waiting, as dispy does
        late = site.start(site.node_hosts[1])  # default flags: announces itself
        results = client.result(60)
    finally:
        client.stop()
    assert results == [[n * n, late.name] for n in range(4)]
    warnings = [line for line in client.stderr.splitlines() if "no node found" in line]
    assert len(warnings) == 1, client.stderr
    warning = warnings[0]
    assert warning.startswith("WARNING ")
    for cause in ("no dispynb-node running", "--no-discovery", "firewall", "secret"):
        assert cause in warning
    assert f"connected from {site.client_host.ip}" not in hidden.log_text()


def test_one_machine_without_a_secret_the_program_finds_its_node(
    network: Network, client_host: Host, tmp_path: Path
) -> None:
    """dispy's first steps on one machine: the node started with no option and no
    secret, then a program that names no node and has no secret either. The node
    serves loopback only and answers the ping the client sends to 127.0.0.1 (dispy's
    client finds a node on its own machine by discovery too)."""
    node = start_node(network, client_host, tmp_path, None)  # no secret, no flag
    try:
        text = node.log_text()
        assert f"127.0.0.1:{NODE_PORT} WITHOUT a secret" in text
        assert "answering pings on UDP 127.0.0.1:" in text
        warned = tmp_path / "warned"
        results = run_client(
            network, client_host, tmp_path, WAITING_CLIENT, {"warned": str(warned)}
        )
    finally:
        node.stop()
    assert results == [[n * n, node.name] for n in range(4)]
    assert not warned.exists()


def test_repeated_hosts_listen_on_each_and_announce_the_network_one(site: Site) -> None:
    """dispynode's repeated ``-i``: the node listens on both addresses; discovery
    announces the non-loopback one, where the client finds it."""
    host = site.node_hosts[0]
    node = site.start(host, "-i", "127.0.0.1", "-i", host.ip, "-d")
    text = node.log_text()
    assert f"127.0.0.1:{NODE_PORT}, {host.ip}:{NODE_PORT}" in text
    assert f"answering pings on UDP {host.ip}:" in text
    assert " DEBUG " in text  # -d is dispynode's --debug
    warned = site.directory / "warned"
    results = site.run_client(
        WAITING_CLIENT,
        {"warned": str(warned)},
        secret=site.secret,
    )
    assert results == [[n * n, node.name] for n in range(4)]


def test_node_without_secret_serves_loopback_only_and_says_why(
    network: Network, node_hosts: list[Host], tmp_path: Path
) -> None:
    """``dispynb-node`` with no flags and no secret: dispynode would serve anyone
    unauthenticated; dispynb listens on 127.0.0.1 only, answers discovery pings only
    there (from clients on its own machine), and says so in one warning."""
    node = start_node(network, node_hosts[0], tmp_path, None)
    try:
        text = node.log_text()
        cpus = counted(node.cpus, "CPU")
        assert f"serving {cpus} on 127.0.0.1:{NODE_PORT} WITHOUT" in text
        warnings = [line for line in text.splitlines() if " WARNING " in line]
        assert len(warnings) == 1
        assert "serving this machine only (127.0.0.1)" in warnings[0]
        assert "DISPYNB_SECRET" in warnings[0]
        answering = [line for line in text.splitlines() if "answering pings" in line]
        assert answering
        assert all("on UDP 127.0.0.1:" in line for line in answering)
    finally:
        node.stop()
    assert node.proc.returncode == 0


#: Counts the datagrams heard on clients' announcement port from ``args["node"]``.
LISTENER = """
import socket
import time

from dispynb.defaults import DISCOVERY_CLIENT_PORT


def main(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", DISCOVERY_CLIENT_PORT))
    sock.settimeout(1.0)
    open(args["ready"], "w").close()
    heard, deadline = 0, time.monotonic() + 20
    while heard < args["expect"] and time.monotonic() < deadline:
        try:
            _data, (ip, _port) = sock.recvfrom(2048)
        except TimeoutError:
            continue
        heard += ip == args["node"]
    return heard
"""


def test_ping_interval_announces_the_node_again_and_again(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    tmp_path: Path,
) -> None:
    """dispynode's ``--ping_interval``: announcements every SECONDS, not only at start
    (clients that started later, or lost a datagram, hear it)."""
    ready = tmp_path / "ready"
    host = node_hosts[0]
    args = {"ready": str(ready), "node": host.ip, "expect": 3}
    client = start_client(network, client_host, tmp_path, LISTENER, args)
    try:
        wait_for(ready.exists, 20, "the listener")
        start(host, "--ping_interval", "0.5")
        assert client.result(30) == 3
    finally:
        client.stop()


def test_wrong_secret_is_named_when_nodes_answer_but_refuse(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    tmp_path: Path,
) -> None:
    """Discovery carries no secret, so a node with another secret answers; the client
    then fails to authenticate and stops with an error naming the cause (dispy's
    client waits silently)."""
    start(node_hosts[0])
    warned = tmp_path / "warned"
    client = start_client(
        network,
        client_host,
        tmp_path,
        WAITING_CLIENT,
        {"warned": str(warned)},
        secret=secrets.token_urlsafe(32),  # strong, but not the nodes'
    )
    try:
        _out, err = client.proc.communicate(timeout=40)
    finally:
        client.stop()
    assert client.proc.returncode != 0
    assert "it uses another secret than this node" in err
    assert "no node found" not in err
