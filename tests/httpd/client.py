"""A tiny HTTP client for the monitor's tests: http.client to 127.0.0.1, raw paths."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

from dispynb.httpd import DispyHTTPServer
from dispynb.httpd.security import CSRF_HEADER


@dataclass
class Reply:
    """One answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes
    cookies: list[str] = field(default_factory=list)

    def json(self) -> Any:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)


class MonitorClient:
    """Requests to one monitor, with the token header by default."""

    def __init__(self, server: DispyHTTPServer, tls: ssl.SSLContext | None = None):
        self.server = server
        self.tls = tls
        self.auth = {"Authorization": f"Token {server.token}"}

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | str | None = None,
        auth: bool = True,
    ) -> Reply:
        """Send one request; ``path`` goes on the wire as is (no normalisation)."""
        if self.tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.server.port, timeout=30, context=self.tls
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            all_headers = {**(self.auth if auth else {}), **(headers or {})}
            skip_host = "Host" in all_headers
            conn.putrequest(
                method, path, skip_host=skip_host, skip_accept_encoding=True
            )
            for name, value in all_headers.items():
                conn.putheader(name, value)
            data = body.encode() if isinstance(body, str) else body
            if data is not None:
                conn.putheader("Content-Length", str(len(data)))
            elif method == "POST":
                conn.putheader("Content-Length", "0")
            conn.endheaders(data)
            resp = conn.getresponse()
            payload = resp.read()
            headers_out = {name.lower(): value for name, value in resp.getheaders()}
            cookies = resp.headers.get_all("Set-Cookie") or []
            return Reply(resp.status, headers_out, payload, cookies)
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def csrf(self) -> str:
        """The CSRF token, as the page gets it: from GET /api/cluster."""
        reply = self.get("/api/cluster")
        assert reply.status == 200, reply
        return reply.headers[CSRF_HEADER.lower()]

    def post(
        self, path: str, body: Any = None, csrf: bool = True, **kwargs: Any
    ) -> Reply:
        headers = dict(kwargs.pop("headers", None) or {})
        if csrf:
            headers[CSRF_HEADER] = self.csrf()
        data = (
            json.dumps(body)
            if body is not None and not isinstance(body, (str, bytes))
            else body
        )
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        return self.request("POST", path, headers=headers, body=data, **kwargs)
