"""A client on one namespace host, node servers on three others: jobs, faults, TLS.

These use explicit node addresses (no discovery) and need no pulses: connection loss
is seen through TCP.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.multihost.conftest import StartNode
from tests.multihost.netns import (
    Host,
    Network,
    run_client,
    start_client,
    wait_for,
)
from tests.multihost.programs import (
    ABANDONED,
    CLIENT,
    FINISHED,
    job_args,
    started_on,
)
from tests.transport.certs import make_cert

pytestmark = [pytest.mark.slow, pytest.mark.multihost]


def test_jobs_run_on_three_hosts(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    secret: tuple[str, Path],
    tmp_path: Path,
) -> None:
    nodes = [start(host) for host in node_hosts]
    args = job_args([n.spec for n in nodes], secret[0], tmp_path / "markers", 18, 0.2)
    jobs = run_client(network, client_host, tmp_path, CLIENT, args)
    assert [j["status"] for j in jobs] == [FINISHED] * 18
    assert [j["result"] for j in jobs] == [n * n for n in range(18)]
    assert {j["ip"] for j in jobs} == {h.ip for h in node_hosts}
    assert {ip for ips in started_on(tmp_path / "markers").values() for ip in ips} == {
        h.ip for h in node_hosts
    }
    print(
        f"namespace setup {network.setup_seconds:.3f} s; node starts "
        + ", ".join(f"{n.start_seconds:.2f}" for n in nodes)
        + " s"
    )


def test_killed_node_abandons_its_jobs(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    secret: tuple[str, Path],
    tmp_path: Path,
) -> None:
    """kill -9 of a node mid-job: its (non-reentrant) jobs end Abandoned, naming it."""
    nodes = [start(host) for host in node_hosts]
    victim = nodes[1]
    markers = tmp_path / "markers"
    args = job_args([n.spec for n in nodes], secret[0], markers, 9, 1.5)
    client = start_client(network, client_host, tmp_path, CLIENT, args)
    try:
        wait_for(
            lambda: any(victim.host.ip in ips for ips in started_on(markers).values()),
            30,
            "a job running on the victim node",
        )
        victim.kill()
        jobs = client.result(60)
    finally:
        client.stop()
    starts = started_on(markers)
    abandoned = [j for j in jobs if j["status"] == ABANDONED]
    finished = [j for j in jobs if j["status"] == FINISHED]
    assert len(abandoned) + len(finished) == 9, jobs
    assert abandoned, jobs
    for job in abandoned:
        assert job["ip"] == victim.host.ip, job
        assert victim.spec in job["exception"], job
        assert "lost" in job["exception"], job
    for job in finished:
        assert job["result"] == job["id"] ** 2
        assert job["ip"] != victim.host.ip, job
    # every job that started on the victim was abandoned; the others all finished
    on_victim = {n for n, ips in starts.items() if victim.host.ip in ips}
    assert on_victim <= {j["id"] for j in abandoned}
    for node in nodes:
        if node is not victim:
            assert node.proc.poll() is None


def test_tls_across_hosts(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    start: StartNode,
    secret: tuple[str, Path],
    tmp_path: Path,
) -> None:
    """Nodes with a certificate for their addresses; the client verifies it."""
    cert, key = make_cert(tmp_path, "nodes", [h.ip for h in node_hosts])
    nodes = [start(h, "--certfile", cert, "--keyfile", key) for h in node_hosts]
    args = job_args([n.spec for n in nodes], secret[0], tmp_path / "markers", 6, 0.1)
    args["options"] = {"cafile": cert}
    jobs = run_client(network, client_host, tmp_path, CLIENT, args)
    assert [j["result"] for j in jobs] == [n * n for n in range(6)]
    assert all("with TLS" in n.log_text() for n in nodes)


def test_node_refuses_network_address_without_secret(
    network: Network, node_hosts: list[Host], tmp_path: Path
) -> None:
    done = network.run(
        node_hosts[0],
        [sys.executable, "-m", "nodeserver", "--host", node_hosts[0].ip],
        timeout=30,
    )
    assert done.returncode == 2, done
    assert "refusing to listen on '10.77.0.1' without a secret" in done.stderr
