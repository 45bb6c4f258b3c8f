"""A client on one namespace host, node servers on three others: jobs, faults, TLS.

These use explicit node addresses (no discovery) and need no pulses: connection loss
is seen through TCP.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.multihost.conftest import Site
from tests.multihost.netns import (
    Host,
    Network,
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


def test_jobs_run_on_three_hosts(site: Site) -> None:
    nodes = [site.start(host) for host in site.node_hosts]
    markers = site.directory / "markers"
    args = job_args([n.spec for n in nodes], site.secret, markers, 18, 0.2)
    jobs = site.run_client(CLIENT, args)
    assert [j["status"] for j in jobs] == [FINISHED] * 18
    assert [j["result"] for j in jobs] == [n * n for n in range(18)]
    assert {j["ip"] for j in jobs} == {h.ip for h in site.node_hosts}
    assert {ip for ips in started_on(markers).values() for ip in ips} == {
        h.ip for h in site.node_hosts
    }
    print(
        f"namespace setup {site.network.setup_seconds:.3f} s; node starts "
        + ", ".join(f"{n.start_seconds:.2f}" for n in nodes)
        + " s"
    )


def test_killed_node_abandons_its_jobs(site: Site) -> None:
    """kill -9 of a node mid-job: its (non-reentrant) jobs end Abandoned, naming it.
    The jobs run until the test releases them, once the node is killed (they slept
    1.5 s: on a loaded machine the victim's had ended, and none was abandoned)."""
    nodes = [site.start(host) for host in site.node_hosts]
    victim = nodes[1]
    markers = site.directory / "markers"
    release = site.directory / "release"
    args = job_args([n.spec for n in nodes], site.secret, markers, 9, 0)
    args["release"] = str(release)
    client = start_client(site.network, site.client_host, site.directory, CLIENT, args)
    try:
        wait_for(
            lambda: any(victim.host.ip in ips for ips in started_on(markers).values()),
            30,
            "a job running on the victim node",
        )
        victim.kill()
        release.touch()
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


def test_tls_across_hosts(site: Site) -> None:
    """Nodes with a certificate for their addresses; the client verifies it."""
    cert, key = make_cert(site.directory, "nodes", [h.ip for h in site.node_hosts])
    nodes = [
        site.start(h, "--certfile", cert, "--keyfile", key) for h in site.node_hosts
    ]
    markers = site.directory / "markers"
    args = job_args([n.spec for n in nodes], site.secret, markers, 6, 0.1)
    args["options"] = {"cafile": cert}
    jobs = site.run_client(CLIENT, args)
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
