"""Discovery across namespace hosts: broadcast, multicast, late nodes, leaving nodes.

The first tests drive `dispynb.transport.discovery.Discovery` from a client program;
the last ones use ``JobCluster(nodes=['10.77.0.*'])`` (the cluster's discovery hook).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispynb.defaults import IPV4_MULTICAST_GROUP, NODE_PORT
from tests.multihost.conftest import Site, StartNode
from tests.multihost.netns import (
    BROADCAST,
    SUBNET,
    Host,
    Network,
    run_client,
    start_client,
    start_node,
    wait_for,
)
from tests.multihost.programs import (
    FINISHED,
    WILDCARD_CLIENT,
    job_args,
    started_on,
)

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

#: Finds nodes with `Discovery`; optionally writes ``ready`` once ``before`` nodes are
#: found (the test then starts more), and waits for ``expect`` nodes, or for
#: ``lost`` leaving announcements.
FINDER = """
import asyncio
import time

from dispynb.transport.discovery import Discovery


async def find(args):
    found, lost = [], []
    discovery = Discovery(multicast=args.get("multicast", False))

    async def until(predicate, what):
        deadline = time.monotonic() + args.get("timeout", 20)
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}: {found} {lost}")
            await asyncio.sleep(0.01)

    await discovery.start(
        args["targets"],
        lambda ip, port, name, cpus: found.append([ip, port, name, cpus]),
        lambda ip, port: lost.append([ip, port]),
    )
    try:
        if "ready" in args:
            await until(lambda: len(found) >= args["before"], "the first nodes")
            open(args["ready"], "w").close()
        await until(lambda: len(found) >= args["expect"], "all nodes")
        await until(lambda: len(lost) >= args.get("lost", 0), "leaving nodes")
    finally:
        discovery.close()
    return {"found": sorted(found), "lost": sorted(lost)}


def main(args):
    return asyncio.run(find(args))
"""


def expected(hosts: list[Host]) -> list[list[object]]:
    """What discovery reports of nodes started with default flags on ``hosts``."""
    return sorted([h.ip, NODE_PORT, f"node-h{h.index}", os.cpu_count()] for h in hosts)


@pytest.mark.parametrize("target", [BROADCAST, "<broadcast>", "255.255.255.255"])
def test_broadcast_ping_finds_every_node(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    tmp_path: Path,
    target: str,
) -> None:
    for host in node_hosts:
        start(host)
    start(client_host, "--no-discovery", name="not-discoverable")  # never found
    args = {"targets": [target], "expect": 3}
    result = run_client(network, client_host, tmp_path, FINDER, args)
    assert result["found"] == expected(node_hosts)


def test_unicast_ping_finds_one_node(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    tmp_path: Path,
) -> None:
    for host in node_hosts:
        start(host)
    args = {"targets": [node_hosts[1].ip], "expect": 1}
    result = run_client(network, client_host, tmp_path, FINDER, args)
    assert result["found"] == expected([node_hosts[1]])


def test_late_node_announces_itself(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    tmp_path: Path,
) -> None:
    """A node started after the client is found without another ping; so is its exit."""
    first = [start(host) for host in node_hosts[:2]]
    ready = tmp_path / "ready"
    args = {
        "targets": [BROADCAST],
        "before": 2,
        "expect": 3,
        "lost": 1,
        "ready": str(ready),
    }
    client = start_client(network, client_host, tmp_path, FINDER, args)
    try:
        wait_for(ready.exists, 30, "the client finding the first two nodes")
        late = start(node_hosts[2])
        wait_for(
            lambda: "answering pings" in late.log_text(), 10, "the late node starting"
        )
        first[0].stop()  # SIGTERM: the node announces that it leaves
        result = client.result(30)
    finally:
        client.stop()
    assert result["found"] == expected(node_hosts)
    assert result["lost"] == [[node_hosts[0].ip, NODE_PORT]]


def test_multicast_ping_and_announce(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    tmp_path: Path,
) -> None:
    nodes = [start(host, "--ipv4_udp_multicast") for host in node_hosts[:2]]
    ready = tmp_path / "ready"
    args = {
        "targets": [IPV4_MULTICAST_GROUP],
        "multicast": True,
        "before": 2,
        "expect": 3,
        "ready": str(ready),
    }
    client = start_client(network, client_host, tmp_path, FINDER, args)
    try:
        wait_for(ready.exists, 30, "the client finding the first two nodes")
        nodes.append(start(node_hosts[2], "--ipv4-multicast"))  # either spelling
        result = client.result(30)
    finally:
        client.stop()
    assert result["found"] == expected(node_hosts)
    for node in nodes:
        assert f"multicast group {IPV4_MULTICAST_GROUP}" in node.log_text()


@pytest.mark.parametrize("multicast", [False, True], ids=["broadcast", "multicast"])
def test_node_listening_on_every_address(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    tmp_path: Path,
    multicast: bool,
) -> None:
    """A node on every address (the default with a secret): found at the address its
    reply came from."""
    host = node_hosts[0]
    node = start(host, "--ipv4_udp_multicast")
    assert "answering pings on UDP *:" in node.log_text()
    args = {
        "targets": [IPV4_MULTICAST_GROUP if multicast else BROADCAST],
        "multicast": multicast,
        "expect": 1,
    }
    result = run_client(network, client_host, tmp_path, FINDER, args)
    assert result["found"] == expected([host])


# -- JobCluster with wildcard node specs ----------------------------------------------


@pytest.mark.parametrize(
    ("spec", "multicast"),
    [(f"{SUBNET}.*", False), ("*", False), (None, False), (f"{SUBNET}.*", True)],
    ids=["subnet-broadcast", "star-broadcast", "nodes-none", "multicast"],
)
def test_cluster_finds_nodes_by_wildcard(
    site: Site, spec: str | None, multicast: bool
) -> None:
    """``nodes=['10.77.0.*']``, ``['*']`` or None (dispy's default) find all nodes."""
    for host in site.node_hosts:
        site.start(host, *(["--ipv4_udp_multicast"] if multicast else []))
    nodes = None if spec is None else [spec]
    args = job_args(nodes, site.secret, site.directory / "markers", 18, 0.2)
    args["before"] = 3
    args["options"] = {"ipv4_udp_multicast": multicast}
    jobs = site.run_client(WILDCARD_CLIENT, args)
    assert [j["status"] for j in jobs] == [FINISHED] * 18
    assert [j["result"] for j in jobs] == [n * n for n in range(18)]
    assert {j["ip"] for j in jobs} == {h.ip for h in site.node_hosts}


def test_cluster_gives_jobs_to_a_late_node(site: Site) -> None:
    for host in site.node_hosts[:2]:
        site.start(host)
    markers = site.directory / "markers"
    ready = site.directory / "ready"
    release = site.directory / "release"
    args = job_args([f"{SUBNET}.*"], site.secret, markers, 12, 1.0)
    # Jobs run until the late node has started one: however slowly the machine
    # starts that node, jobs are still waiting for it (a fixed duration was not).
    args.update(before=2, ready=str(ready), release=str(release))
    late = site.node_hosts[2].ip
    client = site.start_client(WILDCARD_CLIENT, args)
    try:
        wait_for(ready.exists, 30, "the client using the first two nodes")
        site.start(site.node_hosts[2])
        wait_for(
            lambda: any(late in ips for ips in started_on(markers).values()),
            45,
            "a job started on the late node",
        )
        release.touch()
        jobs = client.result(60)
    finally:
        client.stop()
    assert [j["status"] for j in jobs] == [FINISHED] * 12
    assert [j["result"] for j in jobs] == [n * n for n in range(12)]


#: A dispy program without a secret that names no nodes; writes ``ready`` once its
#: cluster has pinged (before any node runs), then runs one job.
NO_SECRET_CLIENT = """
import dispynb


def compute(n):
    return n * n


def main(args):
    cluster = dispynb.JobCluster(compute)
    try:
        open(args["ready"], "w").close()
        job = cluster.submit(7)
        return [job(), job.status]
    finally:
        cluster.close(terminate=True)
"""


def test_client_without_secret_finds_a_node_started_after_it(
    network: Network, client_host: Host, tmp_path: Path
) -> None:
    """A node without a secret serves 127.0.0.1 only and announces nothing when it
    starts: a client without one, started first, finds it by pinging there again
    (as deploy-nodes.md says nodes that start later are used)."""
    ready = tmp_path / "ready"
    client = start_client(
        network, client_host, tmp_path, NO_SECRET_CLIENT, {"ready": str(ready)}
    )
    node = None
    try:
        wait_for(ready.exists, 30, "the client's first pings")
        node = start_node(network, client_host, tmp_path, None)
        assert client.result(30) == [49, FINISHED]
    finally:
        client.stop()
        if node is not None:
            node.stop()
