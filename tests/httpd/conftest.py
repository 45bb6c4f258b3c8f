"""Fixtures for the web monitor: one local node, one cluster, a monitor per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dispynb import JobCluster, LocalCluster
from dispynb.httpd import DispyHTTPServer
from tests import jobs, localnodes
from tests.httpd.client import MonitorClient

#: The module-scoped local node with 2 CPUs, shared with tests/api and tests/jupyter.
local = localnodes.local


@pytest.fixture(scope="module")
def cluster(local: LocalCluster) -> Iterator[JobCluster]:
    """A cluster of `jobs.mark_and_sleep` on the local node."""
    with JobCluster(jobs.mark_and_sleep, nodes=local) as jc:
        # Run jobs first: the node starts its computation processes now, not during
        # a test (whose leftover-process check would see them).
        assert all(job() is not None for job in [jc.submit(None, 0) for _ in range(4)])
        assert jc.wait(timeout=jobs.WAIT)  # counted too: a test's counts start here
        jobs.wait_for_computation_processes(1 + 2)  # the computation and 2 workers
        yield jc


@pytest.fixture
def server(cluster: JobCluster) -> Iterator[DispyHTTPServer]:
    """A monitor of ``cluster`` on a free port of 127.0.0.1."""
    srv = DispyHTTPServer(cluster, port=0, poll_sec=1)
    try:
        yield srv
    finally:
        srv.shutdown(wait=False)


@pytest.fixture
def client(server: DispyHTTPServer) -> MonitorClient:
    """Requests to ``server`` with its token."""
    return MonitorClient(server)
