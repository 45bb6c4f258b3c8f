"""dispy's node management across namespace hosts, nodes started with default flags:
``discover_nodes(['*'])`` and ``allocate_node('<pattern>')`` find and use nodes a
cluster did not name; ``close_node`` releases a node for good, although discovery
keeps hearing from it, until ``allocate_node`` asks for it again."""

from __future__ import annotations

import pytest

from tests.multihost.conftest import Site
from tests.multihost.netns import SUBNET
from tests.multihost.programs import COMMON

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

MANAGER = (
    COMMON
    + """
import threading

def wait_nodes(cluster, count, what):
    deadline = time.monotonic() + 30
    while len(cluster.status().nodes) != count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: {[n.ip_addr for n in cluster.status().nodes]}")
        time.sleep(0.01)
    return sorted(n.ip_addr for n in cluster.status().nodes)


def ran_on(cluster, args, count, seconds):
    jobs = [cluster.submit(n, args["markers"], seconds) for n in range(count)]
    cluster.wait(timeout=60)
    return sorted({job.ip_addr for job in jobs if job.status == 11})


def main(args):
    events = []
    lock = threading.Lock()

    def cluster_status(status, node, job):
        if job is None and status in (4, 16):  # Initialized, Closed
            with lock:
                events.append([int(status), node.ip_addr])

    out = {}
    cluster = dispynb.JobCluster(
        compute,
        nodes=args["nodes"],
        secret=args["secret"],
        cluster_status=cluster_status,
        ping_interval=1,  # discovery pings every second: released nodes answer
        pulse_interval=0.5,
    )
    try:
        out["start"] = wait_nodes(cluster, 1, "the named node")
        out["call"] = getattr(cluster, args["how"])(args["spec"])
        out["found"] = wait_nodes(cluster, 3, args["how"])
        out["ran_on"] = ran_on(cluster, args, 9, 0.1)
        gone = next(n for n in cluster.status().nodes if n.ip_addr == args["close"])
        out["close_node"] = cluster.close_node(gone)
        out["after_close"] = wait_nodes(cluster, 2, "close_node")
        # Several discovery pings (the released node answers each) and pulses pass
        # while these run: it is never set up again.
        out["ran_on_after_close"] = ran_on(cluster, args, 12, 0.5)
        out["nodes_after_close"] = wait_nodes(cluster, 2, "still released")
        out["allocate_node"] = cluster.allocate_node(args["close"])
        out["back"] = wait_nodes(cluster, 3, "allocate_node")
        deadline = time.monotonic() + 30  # callbacks run on their own thread, later
        while time.monotonic() < deadline:
            with lock:
                if sum(status == 4 for status, _ip in events) >= 4:
                    break
            time.sleep(0.01)
        with lock:
            out["events"] = list(events)
        return out
    finally:
        cluster.close(terminate=True)
"""
)


@pytest.mark.parametrize(
    ("how", "spec"),
    [("discover_nodes", ["*"]), ("allocate_node", f"{SUBNET}.*")],
    ids=["discover_nodes-star", "allocate_node-pattern"],
)
def test_discover_allocate_and_close_node(site: Site, how: str, spec: object) -> None:
    for host in site.node_hosts:
        site.start(host)  # default flags: discovery on
    ips = sorted(host.ip for host in site.node_hosts)
    first, closed = site.node_hosts[0].ip, site.node_hosts[2].ip
    markers = site.directory / "markers"
    markers.mkdir()
    args = {
        "nodes": [first],
        "secret": site.secret,
        "markers": str(markers),
        "how": how,
        "spec": spec,
        "close": closed,
    }
    out = site.run_client(MANAGER, args, timeout=120)
    assert out["start"] == [first]
    assert out["call"] == 0
    assert out["found"] == ips
    assert out["ran_on"] == ips
    assert out["close_node"] == 0
    assert out["after_close"] == sorted(set(ips) - {closed})
    assert out["ran_on_after_close"] == sorted(set(ips) - {closed})
    assert out["nodes_after_close"] == sorted(set(ips) - {closed})
    assert out["allocate_node"] == 0
    assert out["back"] == ips
    initialized = [ip for status, ip in out["events"] if status == 4]
    # Each node set up once, the closed one once more only after allocate_node.
    assert sorted(initialized) == sorted([*ips, closed])
    assert [ip for status, ip in out["events"] if status == 16] == [closed]
    assert out["events"][-1] == [4, closed]
