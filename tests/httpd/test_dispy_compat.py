"""The web monitor as dispy programs use it: ``host=''``, add/del_cluster, imports."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from dispynb.errors import ConfigurationError
from dispynb.httpd import DispyHTTPServer
from tests import jobs
from tests.httpd.client import MonitorClient, Reply
from tests.jobs import WAIT

pytestmark = pytest.mark.slow


def ok(reply: Reply) -> dict:
    assert reply.status == 200, (reply.status, reply.body)
    data = reply.json()
    assert isinstance(data, dict)
    return data


@pytest.fixture
def second(local: LocalCluster) -> Iterator[JobCluster]:
    """Another cluster on the same local node."""
    with JobCluster(jobs.square, nodes=local) as jc:
        yield jc


def test_dispy_default_host_serves_loopback_only_and_says_so(
    cluster: JobCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """``host=''`` is dispy's default (every interface, no token, no TLS): dispynb
    keeps the token and serves 127.0.0.1 unless given TLS or allow_plain_http."""
    with caplog.at_level(logging.WARNING, logger="dispynb.httpd"):
        server = DispyHTTPServer(cluster, host="", port=0, poll_sec=1)
    try:
        assert {sock.getsockname()[0] for sock in server._sockets} == {"127.0.0.1"}
        assert server.url.startswith(f"http://127.0.0.1:{server.port}/?token=")
        assert ok(MonitorClient(server).get("/api/cluster"))["name"] == cluster.name
        assert MonitorClient(server).get("/api/cluster", auth=False).status in (
            401,
            403,
        )
    finally:
        server.shutdown(wait=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "serving 127.0.0.1 only" in warnings[0].getMessage()
    assert "allow_plain_http=True" in warnings[0].getMessage()


def test_add_cluster_and_del_cluster(
    server: DispyHTTPServer,
    client: MonitorClient,
    cluster: JobCluster,
    second: JobCluster,
    local: LocalCluster,
) -> None:
    first = ok(client.get("/api/cluster"))
    assert first["key"] == cluster.name
    assert first["clusters"] == [{"key": cluster.name, "name": cluster.name}]

    server.add_cluster(second)
    server.add_cluster(second)  # already shown: nothing changes
    assert server.clusters == [cluster, second]
    job = second.submit(7)
    assert job.wait(timeout=WAIT) and job.status == DispyJob.Finished
    assert second.wait(timeout=WAIT)  # counted (after the job's own waiters)
    shown = ok(client.get("/api/cluster?cluster=square"))
    assert shown["name"] == "square" and shown["key"] == "square"
    assert shown["counts"]["finished"] == 1
    assert [c["key"] for c in shown["clusters"]] == [cluster.name, "square"]
    # Without ?cluster=: the first one, as before.
    assert ok(client.get("/api/cluster"))["name"] == cluster.name
    assert ok(client.post("/api/cancel-all?cluster=square")) == {"cancelled": 0}

    # A third cluster with the same computation name gets its own key.
    with JobCluster(jobs.square, nodes=local) as third:
        server.add_cluster(third)
        assert ok(client.get("/api/cluster?cluster=square-2"))["name"] == "square"
        server.del_cluster(third)

    server.del_cluster(second)
    server.del_cluster(second)  # not shown: ignored
    gone = client.get("/api/cluster?cluster=square")
    assert gone.status == 404
    assert "no cluster 'square'" in gone.json()["reason"]
    assert ok(client.get("/api/cluster"))["clusters"] == first["clusters"]
    assert server.clusters == [cluster]
    assert not second._closed  # the cluster itself is left alone


def oddly_named(x: int) -> int:
    return x


oddly_named.__name__ = " run\x1b[31m <b>1</b>\t"


def test_a_cluster_of_any_name_can_be_shown(
    server: DispyHTTPServer, client: MonitorClient, local: LocalCluster
) -> None:
    """The key a snapshot gives for a cluster finds it (a name with spaces or
    control characters was 404: tornado strips them from query arguments)."""
    with JobCluster(oddly_named, nodes=local) as odd:
        server.add_cluster(odd)
        (key,) = [
            c["key"]
            for c in ok(client.get("/api/cluster"))["clusters"]
            if c["name"] == odd.name
        ]
        shown = ok(client.get("/api/cluster?cluster=" + quote(key, safe="")))
        assert shown["key"] == key and shown["name"] == odd.name
        server.del_cluster(odd)


def test_del_of_every_cluster_then_add(
    server: DispyHTTPServer,
    client: MonitorClient,
    cluster: JobCluster,
    second: JobCluster,
) -> None:
    server.del_cluster(cluster)
    empty = client.get("/api/cluster")
    assert empty.status == 404
    assert "add_cluster" in empty.json()["reason"]
    server.add_cluster(second)
    assert ok(client.get("/api/cluster"))["name"] == "square"


def test_a_monitor_made_with_no_cluster_shows_those_added_later(
    cluster: JobCluster, second: JobCluster
) -> None:
    """dispy's DispyHTTPServer(None), then add_cluster for each cluster of a
    program: before, the monitor refused to start without a cluster."""
    server = DispyHTTPServer(None, port=0, poll_sec=1)
    try:
        client = MonitorClient(server)
        empty = client.get("/api/cluster")
        assert empty.status == 404
        assert "add_cluster" in empty.json()["reason"]
        server.add_cluster(cluster)
        server.add_cluster(second)
        assert server.clusters == [cluster, second]
        assert ok(client.get("/api/cluster"))["name"] == cluster.name
    finally:
        server.shutdown(wait=False)


def test_add_cluster_after_shutdown_is_a_clear_error(cluster: JobCluster) -> None:
    server = DispyHTTPServer(cluster, port=0, poll_sec=1)
    server.shutdown(wait=False)
    with pytest.raises(ConfigurationError, match="shut down"):
        server.add_cluster(cluster)


def test_dispy_httpd_program_with_the_one_extra_line(local: LocalCluster) -> None:
    """dispy's httpd example with ``import dispy`` changed: its ``import dispy.httpd``
    becomes ``import dispynb.httpd`` (the migration guide), and
    ``dispy.httpd.DispyHTTPServer`` works unchanged."""
    import dispynb as dispy
    import dispynb.httpd  # was: import dispy.httpd

    cluster = dispy.JobCluster(jobs.square, nodes=local)
    http_server = dispy.httpd.DispyHTTPServer(cluster, port=0, poll_sec=1)
    try:
        jobs_ = [cluster.submit(n) for n in range(4)]
        cluster.wait()
        assert [job.result for job in jobs_] == [0, 1, 4, 9]
        snapshot = ok(MonitorClient(http_server).get("/api/cluster"))
        assert snapshot["counts"]["finished"] == 4
    finally:
        http_server.shutdown(wait=False)
        cluster.close()
