"""Attacks on the web monitor (dispynb.httpd): token, DNS rebinding, Origin, CSRF.

Every forged request goes to a real monitor of a real cluster; none may change it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from dispynb.httpd import DispyHTTPServer
from tests import jobs
from tests.httpd.client import MonitorClient, Reply

pytestmark = pytest.mark.slow

ROUTES = [
    ("GET", "/"),
    ("GET", "/static/app.js"),
    ("GET", "/api/cluster"),
    ("POST", "/api/jobs/1/cancel"),
    ("POST", "/api/cancel-all"),
    ("POST", "/api/nodes/127.0.0.1:1/cpus"),
]
POSTS = [path for method, path in ROUTES if method == "POST"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[JobCluster]:
    with (
        LocalCluster(cpus=2) as nodes,
        JobCluster(jobs.mark_and_sleep, nodes=nodes) as jc,
    ):
        # The node starts its computation processes now, not during a test.
        assert all(job() is not None for job in [jc.submit(None, 0) for _ in range(2)])
        jobs.wait_for_computation_processes(1 + 2)  # the computation and 2 workers
        yield jc


@pytest.fixture
def client(cluster: JobCluster) -> Iterator[MonitorClient]:
    server = DispyHTTPServer(cluster, port=0, poll_sec=1)
    try:
        yield MonitorClient(server)
    finally:
        server.shutdown(wait=False)


def _refused(replies: list[Reply], status: int = 403) -> int:
    return sum(1 for reply in replies if reply.status == status)


@pytest.mark.attack(
    id="webmon-token",
    title="Web monitor requests without the token, or with a wrong one, on every route",
    goal="every request refused with 403 before any handler runs",
)
def test_requests_without_the_token_are_refused(measure, client):
    replies = [client.request(m, p, auth=False) for m, p in ROUTES]
    wrong = {"Authorization": "Token " + "x" * 43}
    replies += [client.request(m, p, headers=wrong, auth=False) for m, p in ROUTES]
    replies.append(client.get("/api/cluster?token=not-the-right-one", auth=False))
    refused = _refused(replies)
    measure(f"{refused} of {len(replies)} forged requests refused with 403")
    assert refused == len(replies)


@pytest.mark.attack(
    id="webmon-dns-rebinding",
    title="DNS rebinding: a page of evil.example, resolved to 127.0.0.1, calls it",
    goal="a foreign Host header is refused with 403, even with the right token",
)
def test_foreign_host_is_refused(measure, client):
    port = client.server.port
    hosts = ["evil.example", f"evil.example:{port}", "127.0.0.1:1", f"127.0.0.2:{port}"]
    replies = [client.get("/api/cluster", headers={"Host": host}) for host in hosts]
    refused = _refused(replies)
    measure(f"{refused} of {len(hosts)} foreign Host headers refused with 403")
    assert refused == len(hosts)


@pytest.mark.attack(
    id="webmon-cross-origin",
    title="Cross-origin requests to the monitor from a page the user visits",
    goal="a foreign Origin is refused with 403 on GET and POST, even with the token",
)
def test_foreign_origin_is_refused(measure, client):
    port = client.server.port
    origins = ["http://evil.example", "null", f"https://127.0.0.1:{port}"]
    origins.append(f"http://localhost.evil.example:{port}")
    replies = []
    for origin in origins:
        replies.append(client.get("/api/cluster", headers={"Origin": origin}))
        replies.append(client.post("/api/cancel-all", headers={"Origin": origin}))
    refused = _refused(replies)
    measure(f"{refused} of {len(replies)} cross-origin requests refused with 403")
    assert refused == len(replies)


@pytest.mark.attack(
    id="webmon-csrf",
    title="A state-changing POST (cancel, resize) without or with a wrong CSRF token",
    goal="refused with 403; nothing cancelled or changed",
)
def test_post_without_csrf_token_is_refused(measure, client, cluster):
    job = cluster.submit(None, 1.0)  # what a forged cancel-all would kill
    replies = [client.post(path, csrf=False) for path in POSTS]
    wrong = {"X-CSRF-Token": "0" * 64}
    replies += [client.post(path, csrf=False, headers=wrong) for path in POSTS]
    assert job() is not None
    refused = _refused(replies)
    measure(
        f"{refused} of {len(replies)} POSTs refused with 403; "
        f"the running job ended {job.status.name}"
    )
    assert refused == len(replies)
    assert job.status == DispyJob.Finished
