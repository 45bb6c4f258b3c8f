"""Access control of the web monitor: token, Host/Origin checks, CSRF and refusals.

dispy's monitor had no authentication and no CSRF protection, and bound every
interface (reference ``dispy.md`` section 8.1 item 7). Here every request passes
`SecureHandler.prepare`, in this order:

1. ``Host`` must name this server (an allowed host name and our port): a page on an
   attacker's domain that re-resolves to 127.0.0.1 (DNS rebinding) is refused;
2. ``Origin``, when sent, must be this server too (no cross-site requests);
3. the token: ``Authorization: Token <token>``, or ``?token=`` on a GET. The page's
   own files also accept the HttpOnly ``SameSite=Strict`` cookie set when a GET of
   the page carried ``?token=``; that cookie holds a key derived from the token that
   opens nothing else, because browsers send a cookie of 127.0.0.1 to every port of
   127.0.0.1, so any other local server the user visits receives it. The page keeps
   the token itself in the tab's ``sessionStorage`` (scoped to scheme, host and
   port) and sends it in the header;
4. state-changing requests (POST only) also need the ``X-CSRF-Token`` header, whose
   value authenticated GETs of the API return in the same header.

A refusal is a JSON body ``{"error": <status text>, "reason": <what to do>}``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import psutil
import tornado.web

from dispynb.errors import ConfigurationError

logger = logging.getLogger("dispynb.httpd")

#: Header carrying the CSRF token (request and authenticated GET responses).
CSRF_HEADER = "X-CSRF-Token"

_TOKEN_RE = re.compile(r"[A-Za-z0-9._~-]{16,256}")
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def new_token() -> str:
    """Return a fresh random access token (URL- and cookie-safe)."""
    return secrets.token_urlsafe(32)


def check_token(token: str) -> str:
    """Return ``token`` if usable as an access token, else raise ConfigurationError."""
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise ConfigurationError(
            "token must be 16 to 256 characters from A-Z a-z 0-9 . _ ~ -; "
            "leave token=None to get a random one"
        )
    return token


def is_loopback(host: str) -> bool:
    """Tell whether a server bound to ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or '' (all interfaces): assume reachable


def split_host_port(value: str) -> tuple[str, int | None] | None:
    """Split a ``Host``-style ``name[:port]`` (``[v6]:port`` too); None if malformed."""
    if "@" in value or "/" in value:  # no user info or path in a Host header
        return None
    try:
        parts = urlsplit("//" + value)
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return None


@dataclass(frozen=True)
class Guard:
    """The access rules of one monitor: who may connect, under which names.

    Parameters
    ----------
    token:
        The access token.
    port:
        The port the server listens on (``Host`` and ``Origin`` must name it).
    tls:
        Whether the server speaks HTTPS (cookie ``Secure`` flag, ``Origin`` scheme).
    host_names:
        Lower-case host names and addresses a ``Host`` header may use.
    """

    token: str
    port: int
    tls: bool
    host_names: frozenset[str]

    @classmethod
    def create(
        cls, token: str, host: str, port: int, tls: bool, extra: Iterable[str] = ()
    ) -> Guard:
        """Rules for a server bound to ``host``: loopback names, ``host``, ``extra``."""
        names = {*_LOOPBACK_NAMES, *(name.lower().strip("[]") for name in extra)}
        if host and host not in ("0.0.0.0", "::"):
            names.add(host.lower())
        if host in ("", "0.0.0.0", "::"):
            # Every interface: browsers may use any address of this machine.
            names.update(_local_addresses())
        if not is_loopback(host):
            # Or its name; other names must be in allowed_hosts (no DNS lookup here).
            names.add(socket.gethostname().lower())
        return cls(token, port, tls, frozenset(names))

    @property
    def scheme(self) -> str:
        """``https`` or ``http``."""
        return "https" if self.tls else "http"

    @property
    def cookie_name(self) -> str:
        """Name of the token cookie (cookies ignore ports: the port is in the name)."""
        return f"dispynb-monitor-{self.port}"

    @property
    def page_key(self) -> str:
        """The page cookie's value: derived from the token, it opens the page's
        files only (the cookie reaches every port of the host: see the module)."""
        return hmac.new(
            self.token.encode(), b"dispynb-monitor-page", "sha256"
        ).hexdigest()

    @property
    def csrf_token(self) -> str:
        """The CSRF token: derived from the access token, useless without it."""
        return hmac.new(
            self.token.encode(), b"dispynb-monitor-csrf", "sha256"
        ).hexdigest()

    def host_refusal(self, value: str | None) -> str | None:
        """Why ``Host: value`` is refused, or None when it names this server."""
        default = 443 if self.tls else 80
        parsed = split_host_port(value or "")
        if parsed is None or parsed[0] not in self.host_names:
            return (
                f"Host {value!r} is not a name of this monitor (refused against DNS "
                "rebinding); use the URL it printed, or add the name to allowed_hosts"
            )
        if (parsed[1] or default) != self.port:
            return f"Host {value!r} names another port than this monitor's {self.port}"
        return None

    def origin_refusal(self, origin: str) -> str | None:
        """Why a request from page ``origin`` is refused, or None for our own pages."""
        parts = urlsplit(origin)
        if parts.scheme != self.scheme or self.host_refusal(parts.netloc) is not None:
            return f"cross-origin request from {origin!r} refused"
        return None

    def token_matches(self, candidate: str | None) -> bool:
        """Constant-time comparison of ``candidate`` with the token."""
        return candidate is not None and hmac.compare_digest(
            candidate.encode(), self.token.encode()
        )

    def page_key_matches(self, candidate: str | None) -> bool:
        """Constant-time comparison of ``candidate`` with the page cookie's key."""
        return candidate is not None and hmac.compare_digest(
            candidate.encode(), self.page_key.encode()
        )

    def csrf_matches(self, candidate: str | None) -> bool:
        """Constant-time comparison of ``candidate`` with the CSRF token."""
        return candidate is not None and hmac.compare_digest(
            candidate.encode(), self.csrf_token.encode()
        )


def _local_addresses() -> set[str]:
    """The IP addresses of this machine's interfaces (read locally, no traffic)."""
    addresses = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                addresses.add(entry.address.split("%")[0].lower())  # drop a v6 zone
    return addresses


class SecureHandler(tornado.web.RequestHandler):
    """Base of every monitor handler: security headers, access checks, JSON errors."""

    SUPPORTED_METHODS = ("GET", "POST")
    #: Whether the page cookie (`Guard.page_key`) is enough: the page's own files.
    PAGE_FILES = False
    #: The route whose answers carry the CSRF token (a refused POST names it).
    CSRF_ROUTE = "/api/cluster"

    @property
    def guard(self) -> Guard:
        """The server's access rules (the application's ``guard`` setting)."""
        guard: Guard = self.application.settings["guard"]
        return guard

    def set_default_headers(self) -> None:
        """Security headers on every answer, refusals included."""
        self.clear_header("Server")
        for name, value in _SECURITY_HEADERS.items():
            self.set_header(name, value)
        self.set_header("Cache-Control", "no-store")

    def compute_etag(self) -> None:
        """No ETag: answers are live state, never cached or revalidated."""
        return None

    def prepare(self) -> None:
        """Refuse the request unless Host, Origin, token and (POST) CSRF are right."""
        guard = self.guard
        reason = guard.host_refusal(self.request.headers.get("Host"))
        origin = self.request.headers.get("Origin")
        if reason is None and origin is not None:
            reason = guard.origin_refusal(origin)
        if reason is None:
            reason = self._authenticate()
        csrf = self.request.headers.get(CSRF_HEADER)
        if (
            reason is None
            and self.request.method == "POST"
            and not guard.csrf_matches(csrf)
        ):
            reason = (
                f"missing or wrong {CSRF_HEADER} header: send the value that "
                f"GET {self.CSRF_ROUTE} returned in its {CSRF_HEADER} header"
            )
        if reason is not None:
            self.refuse(HTTPStatus.FORBIDDEN, reason)

    def _authenticate(self) -> str | None:
        guard = self.guard
        scheme, _, value = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "token":
            return None if guard.token_matches(value.strip()) else "wrong token"
        query = self.get_query_argument("token", None)
        if query is not None:
            if self.request.method != "GET" or not guard.token_matches(query):
                return "wrong token (?token= is accepted on GET only)"
            if self.PAGE_FILES:  # so that the page's scripts and styles load
                self.set_cookie(
                    guard.cookie_name,
                    guard.page_key,
                    path="/",
                    httponly=True,
                    secure=guard.tls,
                    samesite="Strict",
                )
            return None
        if self.PAGE_FILES and guard.page_key_matches(
            self.get_cookie(guard.cookie_name)
        ):
            return None
        return (
            "missing token: open the URL the monitor printed (it ends in ?token=...) "
            "or send the header 'Authorization: Token <token>'"
        )

    def write_json(self, data: Any, status: int = 200) -> None:
        """Answer with ``data`` as JSON."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(tornado.escape.json_encode(data))

    def refuse(self, status: int, reason: str) -> None:
        """Answer ``{"error": <status text>, "reason": reason}`` and end the request.

        Called from `prepare`, it stops the request before the handler method runs.
        """
        self.write_json({"error": HTTPStatus(status).phrase, "reason": reason}, status)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors raised by tornado itself (404, 405, 500) as JSON too."""
        allowed = " or ".join(self._allowed_methods()) or "nothing"
        method, path = self.request.method, self.request.path
        reasons = {
            404: "no such page or API route",
            405: f"{method} is not allowed on {path}: use {allowed}",
        }
        try:
            phrase = HTTPStatus(status_code).phrase
        except ValueError:
            phrase = "Error"
        if status_code == 405:
            self.set_header("Allow", ", ".join(self._allowed_methods()))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(
            tornado.escape.json_encode(
                {"error": phrase, "reason": reasons.get(status_code, phrase)}
            )
        )

    def _allowed_methods(self) -> list[str]:
        base = tornado.web.RequestHandler
        return [
            method
            for method in self.SUPPORTED_METHODS
            if getattr(type(self), method.lower()) is not getattr(base, method.lower())
        ]

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Log bugs without the request URI (it may hold the token)."""
        if isinstance(value, tornado.web.HTTPError):
            return
        logger.error(
            "web monitor: uncaught exception in %s %s",
            self.request.method,
            self.request.path,
            exc_info=(typ, value, tb),
        )


class NotFoundHandler(SecureHandler):
    """Every unknown path: 404 (after the access checks, so nothing is revealed)."""

    def get(self, *args: str) -> None:
        """404 as JSON."""
        raise tornado.web.HTTPError(404)

    post = get
