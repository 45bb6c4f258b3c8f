"""Fixtures for multi-host tests: namespace hosts on a bridge, nodes in them.

Module scope: one `Network` of 3 node hosts and 1 client host per test module, made
afresh (unique prefix) and always destroyed. Function scope: node servers, stopped
(with their process groups) after each test, whatever happened; `site`, all a test
of nodes and a client program usually takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.multihost import sshd
from tests.multihost.netns import (
    Client,
    Host,
    NetNode,
    Network,
    hosts_or_skip,
    new_secret_file,
    run_client,
    start_client,
    start_node,
)

#: Hosts made per module: three for nodes, the last one for the client.
HOSTS = 4


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    """Four namespace hosts 10.77.0.1-4 on one bridge (h4 is the client's)."""
    with hosts_or_skip(HOSTS) as net:
        yield net


@pytest.fixture
def node_hosts(network: Network) -> list[Host]:
    """The hosts for node servers: h1, h2, h3."""
    return network.hosts[:-1]


@pytest.fixture
def client_host(network: Network) -> Host:
    """The host for client programs: h4."""
    return network.hosts[-1]


@pytest.fixture
def secret(tmp_path: Path) -> tuple[str, Path]:
    """A random secret and its 0600 file, for nodes and clients."""
    return new_secret_file(tmp_path)


@pytest.fixture
def ssh3(
    network: Network, node_hosts: list[Host], tmp_path: Path
) -> Iterator[sshd.SSHSetup]:
    """A real ``sshd`` on each node host (h1-h3), for the SSH launcher tests."""
    reason = sshd.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with sshd.sshd_servers(network, node_hosts, tmp_path / "ssh") as setup:
        yield setup


StartNode = Callable[..., NetNode]


@pytest.fixture
def start(
    network: Network, tmp_path: Path, secret: tuple[str, Path]
) -> Iterator[StartNode]:
    """``start(host, *args, **kwargs)`` starts ``dispynb-node`` with default flags,
    the secret in ``DISPYNB_SECRET``, and ``args`` (see `netns.start_node`).

    Every node started is stopped after the test, with its process group, and every
    link cut by the test is healed.
    """
    started: list[NetNode] = []

    def start_one(host: Host, *args: str, **kwargs: Any) -> NetNode:
        node = start_node(network, host, tmp_path, secret[0], *args, **kwargs)
        started.append(node)
        return node

    try:
        yield start_one
    finally:
        for node in started:
            node.stop()
        for host in network.hosts:
            network.heal(host)


@dataclass
class Site:
    """What a test of nodes and a client program takes: the `Network`, its node
    hosts and client host, `start` for nodes, the secret, the test's directory."""

    network: Network
    node_hosts: list[Host]
    client_host: Host
    start: StartNode
    secret: str
    directory: Path

    def run_client(
        self,
        code: str,
        args: dict[str, Any],
        timeout: float = 60,
        secret: str | None = None,
    ) -> Any:
        """Run the client program ``code`` (`netns.run_client`) on the client host,
        in the test's directory: what its ``main(args)`` returned."""
        return run_client(
            self.network, self.client_host, self.directory, code, args, timeout, secret
        )

    def start_client(
        self,
        code: str,
        args: dict[str, Any],
        directory: Path | None = None,
        secret: str | None = None,
    ) -> Client:
        """Start the client program ``code`` (`netns.start_client`) on the client
        host, in ``directory`` (the test's if not given)."""
        where = directory or self.directory
        return start_client(self.network, self.client_host, where, code, args, secret)


@pytest.fixture
def site(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    secret: tuple[str, Path],
    tmp_path: Path,
) -> Site:
    """The `Site` of this test."""
    return Site(network, node_hosts, client_host, start, secret[0], tmp_path)
