"""The monitor refuses what it must: token, Host, Origin, CSRF, methods, paths."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import pytest

from dispynb import JobCluster
from dispynb.errors import ConfigurationError
from dispynb.httpd import DispyHTTPServer
from dispynb.httpd.assets import load_assets
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


def refused(reply: Reply, status: int = 403, words: str = "") -> str:
    """Assert a JSON refusal with ``status``; return its reason."""
    assert reply.status == status, (reply.status, reply.body)
    data = reply.json()
    assert set(data) == {"error", "reason"}, data
    assert words.lower() in data["reason"].lower(), data
    return str(data["reason"])


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_missing_token_is_refused_everywhere(client, method, path):
    reply = client.request(method, path, auth=False)
    reason = refused(reply, 403, "missing token")
    assert "Authorization: Token" in reason


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_wrong_token_header_is_refused(client, method, path):
    reply = client.request(method, path, headers={"Authorization": "Token x" * 8})
    refused(reply, 403, "wrong token")


def test_wrong_token_in_query_or_cookie_is_refused(client, server):
    refused(client.get("/api/cluster?token=not-the-right-one-at-all", auth=False))
    cookie = {"Cookie": f"dispynb-monitor-{server.port}=not-the-right-one-at-all"}
    refused(
        client.get("/api/cluster", headers=cookie, auth=False), 403, "missing token"
    )


def test_token_query_sets_strict_cookie_and_redirects_to_fragment(client, server):
    reply = client.get(f"/?token={server.token}", auth=False)
    assert reply.status == 302
    assert reply.headers["location"] == f"/#token={server.token}"
    (cookie,) = reply.cookies
    name_value, *attributes = [part.strip() for part in cookie.split(";")]
    assert name_value == f"dispynb-monitor-{server.port}={server._guard.page_key}"
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes)
    page = client.get("/", headers={"Cookie": name_value}, auth=False)
    assert page.status == 200
    assert b"dispynb" in page.body
    assert page.headers["content-type"].startswith("text/html")


def test_token_in_query_is_not_accepted_on_post(client, server):
    reply = client.post(f"/api/cancel-all?token={server.token}", auth=False)
    refused(reply, 403)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1:1",
        "127.0.0.2:{port}",
        "",
        "127.0.0.1:99999999",
    ],
)
def test_foreign_host_is_refused(client, server, host):
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its name."""
    reply = client.get("/api/cluster", headers={"Host": host.format(port=server.port)})
    refused(reply, 403, "host")


@pytest.mark.parametrize("host", ["evil@127.0.0.1:{port}", "127.0.0.1:{port}/x"])
def test_malformed_host_is_refused(client, server, host):
    """tornado itself answers 400 to these; the guard refuses them too."""
    value = host.format(port=server.port)
    assert client.get("/api/cluster", headers={"Host": value}).status == 400
    assert server._guard.host_refusal(value) is not None


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}"]
)
def test_loopback_host_names_are_accepted(client, server, host):
    reply = client.get("/api/cluster", headers={"Host": host.format(port=server.port)})
    assert reply.status == 200


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",
        "https://127.0.0.1:{port}",
        "http://127.0.0.1:1",
        "http://localhost.evil.example:{port}",
    ],
)
def test_foreign_origin_is_refused(client, server, origin):
    headers = {"Origin": origin.format(port=server.port)}
    refused(client.get("/api/cluster", headers=headers), 403, "cross-origin")
    refused(client.post("/api/cancel-all", headers=headers), 403, "cross-origin")


def test_own_origin_is_accepted(client, server):
    for origin in (
        f"http://127.0.0.1:{server.port}",
        f"http://localhost:{server.port}",
    ):
        assert client.get("/api/cluster", headers={"Origin": origin}).status == 200


@pytest.mark.parametrize(
    "path", ["/api/cancel-all", "/api/jobs/1/cancel", "/api/nodes/x/cpus"]
)
def test_post_without_or_with_wrong_csrf_is_refused(client, path):
    refused(client.post(path, csrf=False), 403, "X-CSRF-Token")
    wrong = {"X-CSRF-Token": "0" * 64}
    refused(client.post(path, csrf=False, headers=wrong), 403, "X-CSRF-Token")


@pytest.mark.parametrize(
    "path", ["/api/cancel-all", "/api/jobs/1/cancel", "/api/nodes/x/cpus"]
)
def test_get_on_post_route_is_405(client, path):
    reply = client.get(path)
    refused(reply, 405, "use POST")
    assert reply.headers["allow"] == "POST"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405(client, method):
    reply = client.request(method, "/api/cancel-all")
    assert reply.status == 405


def test_post_on_get_route_is_405(client):
    reply = client.post("/api/cluster")
    refused(reply, 405, "use GET")


TRAVERSALS = [
    "/static/../../etc/passwd",
    "/static/..%2f..%2f..%2fetc%2fpasswd",
    "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/static/%252e%252e%252fetc%252fpasswd",
    "/static/%2fetc%2fpasswd",
    "/static/..%5c..%5cetc%5cpasswd",
    "/static/app.js%00.css",
    "/static/./app.js/../../../etc/passwd",
    "/..%2f..%2fetc/passwd",
    "//etc/passwd",
    "/static/__init__.py",
    "/static/../security.py",
    "/static/..%2fsecurity.py",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_is_refused(client, path):
    reply = client.get(path)
    assert reply.status in (400, 404), (path, reply.status)
    assert b"root:" not in reply.body
    assert b"import" not in reply.body


def test_only_regular_files_of_the_assets_folder_load(tmp_path: Path):
    (tmp_path / "page.html").write_text("<p>ok</p>")
    (tmp_path / "notes.txt").write_text("not a web type")
    os.symlink("/etc/passwd", tmp_path / "evil.css")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.js").write_text("x")
    assets = load_assets(tmp_path)
    assert set(assets) == {"page.html"}
    assert set(load_assets()) == {
        "index.html",
        "app.js",
        "token.js",
        "style.css",
        "favicon.svg",
    }


def test_security_headers_on_answers_and_refusals(client):
    for reply in (client.get("/api/cluster"), client.get("/", auth=False)):
        headers = reply.headers
        assert "default-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
        assert "server" not in headers
        assert "etag" not in headers


def test_unknown_path_is_404_json(client):
    refused(client.get("/nope"), 404, "no such page")
    refused(client.get("/api/nope"), 404, "no such page")


def test_token_is_logged_once_and_never_in_access_logs(cluster, caplog):
    caplog.set_level(logging.DEBUG)
    server = DispyHTTPServer(cluster, port=0, poll_sec=1)
    try:
        client = MonitorClient(server)
        client.get(f"/?token={server.token}", auth=False)
        client.get(f"/api/cluster?token={server.token}", auth=False)
        client.get("/api/cluster?token=wrong-token-wrong-token", auth=False)
    finally:
        server.shutdown()
    with_token = [r for r in caplog.records if server.token in r.getMessage()]
    assert len(with_token) == 1
    assert with_token[0].levelno == logging.INFO
    assert server.url in with_token[0].getMessage()
    assert any("/api/cluster" in r.getMessage() for r in caplog.records)


def test_random_tokens_differ_and_given_token_is_used(cluster):
    first = DispyHTTPServer(cluster, port=0)
    second = DispyHTTPServer(cluster, port=0, token="my-own-token-0123456789")
    try:
        assert first.token != second.token
        assert len(first.token) >= 40
        assert (
            second.url
            == f"http://127.0.0.1:{second.port}/?token=my-own-token-0123456789"
        )
    finally:
        first.shutdown(wait=False)
        second.shutdown(wait=False)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"DocumentRoot": "/tmp"}, "DocumentRoot is not supported"),
        ({"host": "0.0.0.0"}, "certfile/keyfile"),
        ({"host": "10.77.0.1"}, "allow_plain_http=True"),
        ({"token": "short"}, "16 to 256"),
        ({"token": "has spaces and more than 16"}, "16 to 256"),
        ({"keyfile": "/nonexistent.key"}, "keyfile needs certfile"),
        ({"certfile": "/nonexistent.pem"}, "cannot load the TLS certificate"),
        ({"poll_sec": "10"}, "poll_sec must be a number of seconds, not '10'"),
    ],
)
def test_bad_configuration_is_a_clear_error(cluster, kwargs, words):
    with pytest.raises(ConfigurationError, match=words):
        DispyHTTPServer(cluster, port=0, **kwargs)


@pytest.mark.parametrize("poll_sec", [0, -5, float("nan")])
def test_poll_sec_not_positive_is_one_second_with_a_warning(cluster, caplog, poll_sec):
    """dispy's monitor warns and polls every second; it does not refuse."""
    server = DispyHTTPServer(cluster, port=0, poll_sec=poll_sec)
    try:
        assert server.poll_sec == 1.0
        assert MonitorClient(server).get("/api/cluster").status == 200
    finally:
        server.shutdown(wait=False)
    assert any(
        record.levelname == "WARNING" and "invalid poll_sec" in record.getMessage()
        for record in caplog.records
    ), caplog.text


def test_plain_http_on_all_interfaces_needs_the_flag(cluster: JobCluster):
    # Bound to every interface but only ever spoken to over 127.0.0.1.
    server = DispyHTTPServer(cluster, host="0.0.0.0", port=0, allow_plain_http=True)
    try:
        client = MonitorClient(server)
        assert client.get("/api/cluster").status == 200
        refused(
            client.get("/api/cluster", headers={"Host": f"evil.example:{server.port}"})
        )
    finally:
        server.shutdown(wait=False)


def test_port_in_use_is_a_clear_error(cluster, server):
    with pytest.raises(ConfigurationError, match=f"port {server.port}.*port=0"):
        DispyHTTPServer(cluster, port=server.port)


def test_all_interfaces_accept_this_machines_addresses(cluster):
    server = DispyHTTPServer(cluster, host="", port=0, allow_plain_http=True)
    try:
        names = server._guard.host_names
        assert {"127.0.0.1", "localhost", "::1"} <= names
        assert server._guard.host_refusal(f"127.0.0.1:{server.port}") is None
        assert server._guard.host_refusal(f"evil.example:{server.port}") is not None
    finally:
        server.shutdown(wait=False)


def test_signature_is_dispys_plus_token():
    params = list(inspect.signature(DispyHTTPServer).parameters.values())
    dispy = ["cluster", "host", "port", "poll_sec", "DocumentRoot", "keyfile",
             "certfile", "show_job_args"]  # fmt: skip
    assert [p.name for p in params[: len(dispy)]] == dispy
    assert params[len(dispy)].name == "token"
    assert all(p.kind is p.KEYWORD_ONLY for p in params[len(dispy) + 1 :])
    defaults = {p.name: p.default for p in params}
    assert (defaults["host"], defaults["port"], defaults["show_job_args"]) == (
        "127.0.0.1",
        8181,
        False,
    )
