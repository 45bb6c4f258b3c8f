"""IPv6 discovery and IPv6 node specs across namespace hosts.

Every host gets a ULA address ``fd00:77::<i>/64`` next to its IPv4 one (``nodad``: no
duplicate address detection delay). Nodes listen on their IPv6 address or on ``::``;
clients ping the link-local IPv6 discovery group and hear the nodes' announcements.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb.defaults import NODE_PORT
from dispynb.transport.discovery import IPV6_MULTICAST_GROUP
from tests.multihost.conftest import StartNode
from tests.multihost.netns import Host, Network, run_client, start_client, wait_for
from tests.multihost.programs import CLIENT, FINISHED, WILDCARD_CLIENT, job_args
from tests.multihost.test_discovery import FINDER

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

PREFIX = "fd00:77::"


def ip6(host: Host) -> str:
    return f"{PREFIX}{host.index}"


@pytest.fixture(scope="module")
def ipv6(network: Network) -> Iterator[None]:
    """Give every host of the module's network its ULA address."""
    for host in network.hosts:
        network.ip(host, "addr", "add", f"{ip6(host)}/64", "dev", "veth0", "nodad")
    yield


def node_args(host: Host, wildcard: bool) -> list[str]:
    return ["--host", "::" if wildcard else ip6(host)]  # discovery: on by default


def test_ipv6_multicast_ping_and_announcements_find_nodes(
    ipv6: None,
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    tmp_path: Path,
) -> None:
    """Two nodes answer the group ping (one on ``::``); a third, started later, is
    heard by its announcement. Each is reported at its routable IPv6 address."""
    start(node_hosts[0], *node_args(node_hosts[0], wildcard=False))
    start(node_hosts[1], *node_args(node_hosts[1], wildcard=True))
    ready = tmp_path / "ready"
    args = {
        "targets": [IPV6_MULTICAST_GROUP],
        "expect": 3,
        "before": 2,
        "ready": str(ready),
    }
    client = start_client(network, client_host, tmp_path, FINDER, args)
    try:
        wait_for(ready.exists, 30, "the client finding the first two nodes")
        late = start(node_hosts[2], *node_args(node_hosts[2], wildcard=False))
        result = client.result(30)
    finally:
        client.stop()
    cpus = os.cpu_count()
    expected = sorted([ip6(h), NODE_PORT, f"node-h{h.index}", cpus] for h in node_hosts)
    assert result["found"] == expected
    assert f"group {IPV6_MULTICAST_GROUP}" in late.log_text()


def test_cluster_with_ipv6_wildcard_runs_jobs_on_every_node(
    ipv6: None,
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    secret: tuple[str, Path],
    tmp_path: Path,
) -> None:
    for index, host in enumerate(node_hosts):
        start(host, *node_args(host, wildcard=index == 1))
    args = job_args([f"{PREFIX}*"], secret[0], tmp_path / "markers", 12, 0.1)
    args["before"] = 3
    jobs = run_client(network, client_host, tmp_path, WILDCARD_CLIENT, args)
    assert [j["status"] for j in jobs] == [FINISHED] * 12
    assert [j["result"] for j in jobs] == [n * n for n in range(12)]
    assert {j["ip"] for j in jobs} == {ip6(h) for h in node_hosts}


def test_ipv6_unicast_node_specs(
    ipv6: None,
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    secret: tuple[str, Path],
    tmp_path: Path,
) -> None:
    """Named IPv6 nodes, bare and ``[addr]:port``; no discovery involved."""
    first, second = node_hosts[:2]
    start(first, "--host", ip6(first))
    start(second, "--host", "::")
    nodes = [ip6(first), f"[{ip6(second)}]:{NODE_PORT}"]
    args = job_args(nodes, secret[0], tmp_path / "markers", 6, 0.1)
    jobs = run_client(network, client_host, tmp_path, CLIENT, args)
    assert [j["status"] for j in jobs] == [FINISHED] * 6
    assert {j["ip"] for j in jobs} == {ip6(first), ip6(second)}
