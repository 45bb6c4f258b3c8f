"""``dispynb-node --ext-host``: a node with two addresses announces one of them.

Node host h1 gets a second address, 10.78.0.1, on its veth; the client host h4 has only
10.77.0.4 plus an on-link route to 10.78.0.0/24. The node answers discovery from
10.77.0.1 and claims 10.78.0.1. The client follows the claim only when one of its
node specs (other than a bare '*') covers it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.conftest import StartNode
from tests.multihost.netns import SUBNET, Host, Network, run_client
from tests.multihost.programs import FINISHED, WILDCARD_CLIENT, job_args

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

EXT_SUBNET = "10.78.0"


@pytest.fixture
def two_homed(
    network: Network, node_hosts: list[Host], client_host: Host
) -> Iterator[Host]:
    """h1 with a second address on 10.78.0.0/24, reachable from the client host."""
    host = node_hosts[0]
    ext = f"{EXT_SUBNET}.{host.index}"
    network.ip(host, "addr", "add", f"{ext}/24", "dev", "veth0")
    network.ip(client_host, "route", "add", f"{EXT_SUBNET}.0/24", "dev", "veth0")
    try:
        yield host
    finally:
        network.ip(client_host, "route", "del", f"{EXT_SUBNET}.0/24", check=False)
        network.ip(host, "addr", "del", f"{ext}/24", "dev", "veth0", check=False)


@pytest.mark.parametrize(
    ("nodes", "reached"),
    [([f"{SUBNET}.*", f"{EXT_SUBNET}.*"], "ext"), (["*"], "sender")],
    ids=["narrow-spec-uses-ext", "bare-star-ignores-claim"],
)
def test_ext_host_followed_only_under_a_narrow_spec(
    network: Network,
    two_homed: Host,
    client_host: Host,
    start: StartNode,
    secret: tuple[str, Path],
    tmp_path: Path,
    nodes: list[str],
    reached: str,
) -> None:
    ext = f"{EXT_SUBNET}.{two_homed.index}"
    node = start(two_homed, "--ext_host", ext)  # dispynode's spelling
    args = job_args(nodes, secret[0], tmp_path / "markers", 4, 0.05)
    args["before"] = 1
    jobs = run_client(network, client_host, tmp_path, WILDCARD_CLIENT, args)
    assert [j["status"] for j in jobs] == [FINISHED] * 4
    assert [j["result"] for j in jobs] == [n * n for n in range(4)]
    expected = ext if reached == "ext" else two_homed.ip
    assert {j["ip"] for j in jobs} == {expected}
    # The node saw the client's connection (and its authentication) come in.
    assert "connected from" in node.log_text()
