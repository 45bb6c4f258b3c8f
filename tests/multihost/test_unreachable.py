"""What a script's user reads when the machine it names does not answer at all.

A script names a node by address, as the getting-started page shows, and runs on a
namespace host. The machine there may not exist (a typo in the address), may drop
every packet (down behind a switch that still knows it, a firewall that drops), or
may accept the connection and never answer (a stopped TLS node). Each last line must
say what that means and what to check, not an errno's "Connect call failed" or a
bare "timed out".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.multihost.conftest import Site
from tests.multihost.netns import SUBNET, Host, Network, start_node
from tests.transport.certs import make_cert

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

SCRIPT = """
import sys
import dispynb as dispy

def double(x):
    return 2 * x

options = {"cafile": sys.argv[3]} if len(sys.argv) > 3 else {}
cluster = dispy.JobCluster(double, nodes=[sys.argv[1]], secret=sys.argv[2], **options)
print(cluster.submit(3)())
"""

#: An address on the hosts' network where no host is.
NOBODY = f"{SUBNET}.99"


def last_line(
    network: Network, host: Host, tmp_path: Path, *args: str
) -> tuple[str, str]:
    """Run the script on ``host`` with ``args``; its traceback's last line, and all
    it wrote on standard error."""
    script = tmp_path / "client.py"
    script.write_text(SCRIPT)
    done = network.run(host, [sys.executable, str(script), *args], timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stderr.strip().splitlines()[-1], done.stderr


def test_an_address_where_no_machine_is_says_to_check_it(
    network: Network, client_host: Host, secret: tuple[str, Path], tmp_path: Path
) -> None:
    line, stderr = last_line(network, client_host, tmp_path, NOBODY, secret[0])
    assert line == (
        f"dispynb.errors.ConnectionClosedError: cannot connect to {NOBODY}:9711: no "
        "machine answers at that address (no route to host): check that the address "
        "is right and that the machine is up and on this network"
    ), stderr


def test_a_machine_dropping_every_packet_is_named_with_what_to_check(
    network: Network, client_host: Host, secret: tuple[str, Path], tmp_path: Path
) -> None:
    """The client knows a link-layer address for it, but nothing there answers:
    its connection attempt gets no reply at all until the client gives up."""
    network.ip(
        client_host, "neigh", "replace", NOBODY, "lladdr", "02:00:00:00:00:99",
        "dev", "veth0", "nud", "permanent",
    )  # fmt: skip
    try:
        line, stderr = last_line(network, client_host, tmp_path, NOBODY, secret[0])
    finally:
        network.ip(client_host, "neigh", "del", NOBODY, "dev", "veth0", check=False)
    assert line == (
        f"dispynb.errors.ConnectTimeoutError: connecting to {NOBODY}:9711 timed out "
        "after 10 s: nothing answered there, so the machine is down or unreachable "
        "from here, or a firewall drops connections to port 9711; check the address, "
        "that the machine is up, and that its firewall lets dispynb-node "
        "connections in"
    ), stderr


def test_a_node_started_without_a_secret_is_named_as_a_likely_cause(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    secret: tuple[str, Path],
    tmp_path: Path,
) -> None:
    """The first try across machines: ``dispynb-node`` started without a secret
    listens on 127.0.0.1 only (its log says so, on the other machine); the script
    was told only that nothing listens there and to check that a node runs, which
    one does."""
    host = node_hosts[0]
    node = start_node(network, host, tmp_path, None, "--cpus", "1")
    try:
        line, stderr = last_line(network, client_host, tmp_path, host.ip, secret[0])
    finally:
        node.stop()
    assert "WITHOUT a secret (loopback only)" in node.log_text()
    assert line == (
        f"dispynb.errors.ConnectionClosedError: cannot connect to {host.ip}:9711: "
        "nothing listens on port 9711 there (connection refused; a node started "
        f"with --port N is named '{host.ip}:N'; one started without a secret "
        "listens on 127.0.0.1 only: give it DISPYNB_SECRET or --secret-file); is "
        "dispynb-node running there?"
    ), stderr


def test_a_stopped_tls_node_is_said_to_have_accepted_the_connection(
    site: Site,
) -> None:
    """The kernel completes the TCP handshake of a stopped process: the machine is
    there, so the fix is not to check the address (before: the same bare "timed
    out" as for a machine that is not there)."""
    host = site.node_hosts[0]
    cert, key = make_cert(site.directory, "node", [host.ip])
    node = site.start(host, "--certfile", cert, "--keyfile", key)
    node.pause()
    try:
        line, stderr = last_line(
            site.network, site.client_host, site.directory, node.spec, site.secret, cert
        )
    finally:
        node.resume()
    assert line == (
        f"dispynb.errors.ConnectTimeoutError: {node.spec} accepted the connection but "
        "did not complete the TLS handshake in 10 s: the process there is stopped "
        "(SIGSTOP, Ctrl-Z, a suspended batch job), too busy to answer, or no "
        "dispynb-node"
    ), stderr
