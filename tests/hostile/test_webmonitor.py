"""Attacks on the web monitor (dispynb.httpd): token, DNS rebinding, Origin, CSRF.

Every forged request goes to a real monitor of a real cluster; none may change it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack

import psutil
import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from dispynb.httpd import DispyHTTPServer
from dispynb.httpd.connections import MAX_CONNECTIONS
from tests import jobs
from tests.httpd.client import MonitorClient, Reply
from tests.httpd.monitor_process import started_monitor

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


@pytest.mark.attack(
    id="webmon-cookie-scope",
    title="Another server on 127.0.0.1 that the user's browser visits reads the "
    "cookies it is sent (cookies ignore ports)",
    goal="no cookie holds the token, and what one holds opens no API route",
)
def test_the_page_cookie_opens_no_api(measure, client):
    token = client.server.token
    (cookie,) = client.get(f"/?token={token}", auth=False).cookies
    name_value = cookie.split(";", 1)[0]
    jar = {"Cookie": name_value}
    replies = [client.get("/api/cluster", headers=jar, auth=False)]
    replies += [client.post(path, headers=jar, auth=False) for path in POSTS]
    refused = _refused(replies)
    measure(
        f"token in the cookie: {token in name_value}; {refused} of {len(replies)} "
        "API requests with the cookie refused with 403"
    )
    assert token not in name_value and refused == len(replies)


@pytest.mark.attack(
    id="webmon-connection-flood",
    title="300 connections that send nothing, half a header, or a header announcing "
    "a body never sent, to a monitor whose process has 256 descriptors",
    goal="at most 64 held; the user is served meanwhile; no traceback in the log "
    "(was: an EMFILE loop, 238,000 tracebacks in 40 s, nobody served)",
)
def test_connection_flood(measure, tmp_path):
    with started_monitor(tmp_path) as monitor:
        proc = psutil.Process(monitor.proc.pid)
        partial = f"GET /api/cluster HTTP/1.1\r\nHost: 127.0.0.1:{monitor.port}\r\n"
        kinds = [
            b"",
            partial.encode(),
            (partial + "Content-Length: 99\r\n\r\n").encode(),
        ]
        with ExitStack() as stack:
            for n in range(300):
                sock = socket.create_connection(("127.0.0.1", monitor.port), 10)
                stack.enter_context(sock).sendall(kinds[n % 3])
            status = monitor.get()
            held = sum(
                1
                for c in proc.net_connections("tcp")
                if c.laddr.port == monitor.port and c.status == psutil.CONN_ESTABLISHED
            )
    tracebacks = monitor.log.read_text().count("Traceback")
    measure(
        f"{held} connections held of 300; the user's request: {status}; "
        f"{tracebacks} tracebacks"
    )
    assert held <= MAX_CONNECTIONS and status == 200 and tracebacks == 0
