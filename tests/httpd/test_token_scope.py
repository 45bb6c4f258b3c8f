"""The access token never reaches another server on this machine.

Browsers send a cookie of 127.0.0.1 to every port of 127.0.0.1 (cookies ignore
ports, and ``SameSite`` counts every port as the same site), so any other local
server the user's browser visits receives the monitor's cookies. The token must
therefore never be in a cookie, and what is in one must open no API route.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from dispynb import JobCluster
from dispynb.httpd import DispyHTTPServer
from tests.browser import chromium_page, requires_chromium
from tests.httpd.client import MonitorClient

pytestmark = pytest.mark.slow


class CookieJarServer:
    """Another local web server (another user's, say): records the Cookie headers
    browsers send it and serves a page that fetches from itself."""

    def __init__(self) -> None:
        self.cookies: list[str] = []
        jar = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jar.cookies.append(self.headers.get("Cookie") or "")
                body = b"<!doctype html><img src='/pixel'><p id=done>here</p>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)


@pytest.fixture
def other_server() -> Iterator[CookieJarServer]:
    jar = CookieJarServer()
    yield jar
    jar.close()


def cookie_values(header: str) -> list[str]:
    return [part.split("=", 1)[-1].strip() for part in header.split(";") if part]


def test_the_page_cookie_is_not_the_token_and_opens_no_api(client, server):
    reply = client.get(f"/?token={server.token}", auth=False)
    assert reply.status == 302
    assert reply.headers["location"] == f"/#token={server.token}"
    (cookie,) = reply.cookies
    name_value = cookie.split(";", 1)[0]
    assert server.token not in name_value
    page = {"Cookie": name_value}
    assert client.get("/", headers=page, auth=False).status == 200
    assert client.get("/static/app.js", headers=page, auth=False).status == 200
    for path in ("/api/cluster", "/nope"):
        assert client.get(path, headers=page, auth=False).status == 403
    # Nor does a cookie holding the token itself open the API any more.
    token = {"Cookie": f"dispynb-monitor-{server.port}={server.token}"}
    assert client.get("/api/cluster", headers=token, auth=False).status == 403


@requires_chromium
@pytest.mark.browser
def test_another_local_server_the_browser_visits_gets_no_token(
    cluster: JobCluster, other_server: CookieJarServer
) -> None:
    from playwright.sync_api import expect

    server = DispyHTTPServer(cluster, port=0, poll_sec=1)
    try:
        with chromium_page() as page:
            page.goto(server.url)
            expect(page.locator("#connection")).to_have_text("live")
            assert page.url == f"http://127.0.0.1:{server.port}/"  # token not shown
            other = page.context.new_page()
            other.goto(f"http://127.0.0.1:{other_server.port}/")
            expect(other.locator("#done")).to_have_text("here")
            # The monitor's page still works after a reload (token kept in the tab).
            page.reload()
            expect(page.locator("#connection")).to_have_text("live")
        received = [c for c in other_server.cookies if c]
        assert received, "the browser sent the other server no cookie at all"
        assert not any(server.token in header for header in received), received
        client = MonitorClient(server)
        for header in received:
            for value in cookie_values(header):
                replay = {"Cookie": f"dispynb-monitor-{server.port}={value}"}
                reply = client.get("/api/cluster", headers=replay, auth=False)
                assert reply.status == 403, reply
    finally:
        server.shutdown(wait=False)
