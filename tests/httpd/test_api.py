"""The monitor's JSON API against a real cluster on a local node."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from dispynb.errors import ConfigurationError
from dispynb.httpd import DispyHTTPServer
from tests import jobs
from tests.httpd.client import MonitorClient, Reply
from tests.jobs import WAIT, wait_for_path, wait_until
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow


def ok(reply: Reply) -> dict:
    assert reply.status == 200, (reply.status, reply.body)
    data = reply.json()
    assert isinstance(data, dict)
    return data


def node_id(client: MonitorClient) -> str:
    (node,) = ok(client.get("/api/cluster"))["nodes"]
    return str(node["id"])


def test_snapshot_shows_nodes_jobs_and_counts(client, cluster):
    before = ok(client.get("/api/cluster"))["counts"]
    job = cluster.submit(None, 0)
    assert job() is not None
    # Counted and listed: a job's own waiters wake before the monitor hears of it.
    assert cluster.wait(timeout=WAIT)
    snap = ok(client.get("/api/cluster"))
    assert snap["name"] == cluster.name
    assert snap["closed"] is False
    (node,) = snap["nodes"]
    assert node["id"] == f"127.0.0.1:{node['port']}"
    assert node["cpus"] == 2
    assert node["jobs_done"] >= 1
    assert snap["counts"]["finished"] == before["finished"] + 1
    assert snap["counts"]["total"] == before["total"] + 1
    (record,) = [j for j in snap["jobs"] if j["key"] == job._key]
    assert record["status"] == "Finished"
    assert record["args"] is None  # show_job_args is off by default
    assert record["end_time"] >= record["start_time"] >= record["submit_time"]


def test_show_job_args_shows_a_short_repr(cluster):
    server = DispyHTTPServer(cluster, port=0, show_job_args=True)
    try:
        job = cluster.submit(None, 0.001)
        job()
        assert cluster.wait(timeout=WAIT)  # listed (after the job's own waiters)
        jobs = ok(MonitorClient(server).get("/api/cluster"))["jobs"]
        (record,) = [j for j in jobs if j["key"] == job._key]
        assert record["args"] == "None, 0.001"
    finally:
        server.shutdown(wait=False)


def test_max_jobs_limits_the_list_and_bad_values_are_400(client, cluster):
    for job in [cluster.submit(None, 0) for _ in range(3)]:
        job()
    assert cluster.wait(timeout=WAIT)  # listed (after the jobs' own waiters)
    assert len(ok(client.get("/api/cluster?max_jobs=2"))["jobs"]) == 2
    for bad in ("0", "x", "99999999", "-1"):
        reply = client.get(f"/api/cluster?max_jobs={bad}")
        assert reply.status == 400
        assert "max_jobs" in reply.json()["reason"]
    assert client.get("/api/cluster?since=abc").status == 400


def test_long_poll_answers_on_change(client, cluster, server):
    version = ok(client.get("/api/cluster"))["version"]
    threading.Timer(0.2, cluster.submit, (None, 0)).start()
    started = time.monotonic()
    changed = ok(client.get(f"/api/cluster?since={version}"))
    assert changed["version"] != version
    assert time.monotonic() - started < server.poll_sec + 5
    assert cluster.wait(timeout=WAIT)


@pytest.fixture
def own() -> Iterator[tuple[JobCluster, MonitorClient]]:
    """A cluster of its own and its monitor: cancelling replaces worker processes,
    which closing the cluster within the test ends."""
    with (
        LocalCluster(cpus=2) as nodes,
        JobCluster(jobs.mark_and_sleep, nodes=nodes) as jc,
    ):
        server = DispyHTTPServer(jc, port=0)
        try:
            yield jc, MonitorClient(server)
        finally:
            server.shutdown(wait=False)


def test_cancel_running_job(own, tmp_path):
    cluster, client = own
    marker = str(tmp_path / "started")
    job = cluster.submit(marker, 30)
    wait_for_path(marker)
    reply = client.post(f"/api/jobs/{job._key}/cancel")
    assert ok(reply) == {"cancelled": True, "key": job._key}
    assert job.wait(WAIT)
    assert job.status in (DispyJob.Cancelled, DispyJob.Terminated)
    again = client.post(f"/api/jobs/{job._key}/cancel")
    assert again.status == 404
    assert "already done" in again.json()["reason"]


def test_cancel_all(own, tmp_path):
    cluster, client = own
    markers = [str(tmp_path / f"m{i}") for i in range(2)]
    running = [cluster.submit(marker, 30) for marker in markers]
    pending = [cluster.submit(None, 30) for _ in range(3)]
    for marker in markers:
        wait_for_path(marker)
    data = ok(client.post("/api/cancel-all"))
    assert data == {"cancelled": 5}
    assert cluster.wait(timeout=WAIT)
    for job in running + pending:
        assert job.status in (DispyJob.Cancelled, DispyJob.Terminated), job.status
    counts = ok(client.get("/api/cluster"))["counts"]
    assert counts["running"] == counts["pending"] == 0
    assert counts["cancelled"] + counts["terminated"] == 5


def test_unknown_or_bad_job_key(client):
    reply = client.post("/api/jobs/987654321/cancel")
    assert reply.status == 404
    assert "no job with key 987654321" in reply.json()["reason"]
    for bad in ("abc", "-1", "1.5", "9" * 30):
        reply = client.post(f"/api/jobs/{bad}/cancel")
        assert reply.status == 400, bad
        assert "job key must be" in reply.json()["reason"]


def test_set_node_cpus(client, cluster):
    node = node_id(client)
    try:
        assert ok(client.post(f"/api/nodes/{node}/cpus", {"cpus": 1})) == {
            "node": node,
            "cpus": 1,
        }
        wait_until(lambda: ok(client.get("/api/cluster"))["nodes"][0]["cpus"] == 1)
        assert cluster.status().nodes[0].cpus == 1
        # More than the node has is capped at what it set up.
        assert ok(client.post(f"/api/nodes/{node}/cpus", {"cpus": 64}))["cpus"] == 2
    finally:
        cluster.set_node_cpus(node, 2)


def test_set_cpus_unknown_node_and_bad_bodies(client):
    reply = client.post("/api/nodes/10.1.2.3:9/cpus", {"cpus": 1})
    assert reply.status == 404
    assert "no node '10.1.2.3:9'" in reply.json()["reason"]
    node = node_id(client)
    bad_bodies = [
        "not json",
        "[1, 2]",
        "{}",
        '{"cpus": "2"}',
        '{"cpus": 2.5}',
        '{"cpus": true}',
        '{"cpus": null}',
        '{"cpus": 100000}',
        b"\xff\xfe",
        "[" * 30_000 + "]" * 30_000,  # deeper than the JSON parser recurses
        '{"cpus": ' + "9" * 5000 + "}",  # more digits than int() takes
    ]
    for body in bad_bodies:
        reply = client.post(f"/api/nodes/{node}/cpus", body)
        assert reply.status == 400, body[:40]
        assert "cpus" in reply.json()["reason"] or "JSON" in reply.json()["reason"]


def test_oversized_body_is_refused(client):
    """Bodies over 64 kB: tornado drops the connection before reading them."""
    node = node_id(client)
    big = '{"cpus": 1, "x": "' + "a" * 100_000 + '"}'
    try:
        reply = client.post(f"/api/nodes/{node}/cpus", big)
    except (ConnectionError, http.client.HTTPException):
        return
    assert reply.status in (400, 413)


def test_port_zero_url_and_shutdown(cluster):
    server = DispyHTTPServer(cluster, port=0)
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/?token={server.token}"
    assert ok(MonitorClient(server).get("/api/cluster"))
    server.shutdown()
    server.shutdown()  # idempotent
    with (
        pytest.raises(OSError),
        socket.create_connection(("127.0.0.1", server.port), 2),
    ):
        pass


def test_a_port_in_use_says_to_shut_the_other_monitor_or_give_another(cluster):
    """Two scripts (or a script run again while the first runs) each start a
    monitor on the default port: the message said "already in use (by a node or
    scheduler ...): stop it, or choose another port; pick another port"."""
    first = DispyHTTPServer(cluster, port=0)
    try:
        with pytest.raises(ConfigurationError) as raised:
            DispyHTTPServer(cluster, port=first.port)
    finally:
        first.shutdown()
    assert str(raised.value) == (
        f"cannot listen on 127.0.0.1 port {first.port}: it is in use, most likely "
        "by another web monitor (of another script or notebook); shut that one "
        "down, or give another port= (port=0 picks a free one)"
    )


def test_shutdown_wait_answers_pending_long_polls(cluster):
    server = DispyHTTPServer(cluster, port=0, poll_sec=20)
    client = MonitorClient(server)
    version = ok(client.get("/api/cluster"))["version"]
    replies: list[Reply] = []
    poller = threading.Thread(
        target=lambda: replies.append(client.get(f"/api/cluster?since={version}"))
    )
    poller.start()
    # The long-poll is waiting (or already answered: a node's status update).
    (view,) = server._views.values()
    wait_until(lambda: view.feed.waiting == 1 or bool(replies))
    started = time.monotonic()
    server.shutdown(wait=True)
    poller.join(WAIT)
    assert time.monotonic() - started < 10  # not the 20 s of poll_sec
    assert [reply.status for reply in replies] == [200]


def test_monitor_shows_a_closed_cluster_and_long_polls_time_out(local):
    cluster = JobCluster(lambda x: x, nodes=local)
    server = DispyHTTPServer(cluster, port=0, poll_sec=0.5)
    try:
        client = MonitorClient(server)
        assert ok(client.get("/api/cluster"))["closed"] is False
        cluster.close()
        snap = ok(client.get("/api/cluster"))
        assert snap["closed"] is True
        # Nothing changes any more: a long-poll answers after poll_sec, same version.
        started = time.monotonic()
        again = ok(client.get(f"/api/cluster?since={snap['version']}"))
        assert again["version"] == snap["version"]
        assert 0.4 <= time.monotonic() - started < 5
    finally:
        server.shutdown(wait=False)
        cluster.close()


def test_https_with_certfile_and_keyfile(cluster, tmp_path: Path):
    certfile, keyfile = make_cert(tmp_path, "monitor")
    server = DispyHTTPServer(cluster, port=0, certfile=certfile, keyfile=keyfile)
    try:
        assert server.url.startswith(f"https://127.0.0.1:{server.port}/?token=")
        context = ssl.create_default_context(cafile=certfile)
        client = MonitorClient(server, tls=context)
        assert ok(client.get("/api/cluster"))["name"] == cluster.name
        reply = client.get(f"/?token={server.token}", auth=False)
        assert "Secure" in reply.cookies[0]
        origin = {"Origin": f"http://127.0.0.1:{server.port}"}
        assert client.get("/api/cluster", headers=origin).status == 403
    finally:
        server.shutdown(wait=False)


def test_browser_gone_during_long_poll_is_quiet(local):
    """A tab closed while its long-poll waits: no error, the request just ends."""
    cluster = JobCluster(jobs.square, nodes=local)
    cluster.close()  # nothing changes any more: the long-poll waits its poll_sec
    server = DispyHTTPServer(cluster, port=0, poll_sec=0.3)
    try:
        version = ok(MonitorClient(server).get("/api/cluster"))["version"]
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
            sock.sendall(
                f"GET /api/cluster?since={version} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{server.port}\r\n"
                f"Authorization: Token {server.token}\r\n\r\n".encode()
            )
            (view,) = server._views.values()
            wait_until(lambda: view.feed.waiting == 1)
        wait_until(lambda: server._context.active == 0)
        assert ok(MonitorClient(server).get("/api/cluster"))["closed"] is True
    finally:
        server.shutdown()


def test_reachable_as_dispy_httpd() -> None:
    # dispy programs write dispy.httpd.DispyHTTPServer after `import dispynb as dispy`
    import dispynb as dispy
    from dispynb.httpd import DispyHTTPServer

    assert dispy.httpd.DispyHTTPServer is DispyHTTPServer


def test_a_notebook_run_is_shown_by_its_cluster(local):
    """What a notebook holds after ``%%dispy --into NAME`` is a run: given it, the
    monitor failed in its thread with "AttributeError: 'Run' object has no
    attribute '_jobs'". It shows the run's cluster; anything else but a cluster
    (a LocalCluster) is refused, saying what it takes."""
    from dispynb.errors import ConfigurationError
    from dispynb.jupyter.run import Run

    run = Run.map(jobs.echo, [1, 2], nodes=local, progress="none", wait=False)
    try:
        server = DispyHTTPServer(run, port=0)
        try:
            assert server.clusters == [run.cluster]
            snap = ok(MonitorClient(server).get("/api/cluster"))
            assert snap["id"] == run.cluster.uid
        finally:
            server.shutdown(wait=False)
    finally:
        assert run.wait(timeout=WAIT, echo=False)
    with pytest.raises(ConfigurationError, match=r"JobCluster .*not LocalCluster"):
        DispyHTTPServer(local, port=0)


def test_a_notebook_run_shown_after_it_finished_lists_its_jobs(local):
    """``%%dispy --into run`` then ``DispyHTTPServer(run)``, as web-monitor.md
    shows it: the run had ended and its cluster closed, and the page said "No job
    submitted yet." under "Jobs (2)". Its ended jobs are listed, with their nodes."""
    from dispynb.jupyter.run import Run

    run = Run.map(jobs.echo, [1, 2], nodes=local, progress="none")
    assert run.cluster._closed
    server = DispyHTTPServer(run, port=0)
    try:
        snap = ok(MonitorClient(server).get("/api/cluster"))
    finally:
        server.shutdown(wait=False)
    assert snap["counts"]["total"] == 2
    listed = sorted((job["id"], job["status"], job["node"]) for job in snap["jobs"])
    (where,) = local.node_specs()
    assert listed == [(repr(job.id), "Finished", where) for job in run.jobs]
