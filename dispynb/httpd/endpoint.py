"""Where a web monitor listens, and who may use it: `open_endpoint`.

Shared by the client's `DispyHTTPServer` and ``dispynb-scheduler --httpd``: the same
rules for both (loopback by default, HTTPS or an explicit opt-in for any other
address, a random token, the `Guard` that checks Host, Origin, token and CSRF).
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from dispynb.errors import ConfigurationError
from dispynb.httpd.security import Guard, check_token, is_loopback, new_token
from dispynb.transport.addressing import bind_listening

logger = logging.getLogger("dispynb.httpd")


@dataclass
class Endpoint:
    """Listening sockets of a monitor and its access rules."""

    sockets: list[socket.socket]
    guard: Guard
    ssl_context: ssl.SSLContext | None
    #: The address bound, as given ('' or '0.0.0.0': every interface).
    host: str
    port: int

    @property
    def token(self) -> str:
        """The access token."""
        return self.guard.token

    @property
    def url(self) -> str:
        """The page's full URL, token included: open it in a browser."""
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.guard.scheme}://{host}:{self.port}/?token={self.token}"

    def close(self) -> None:
        """Close the listening sockets."""
        for sock in self.sockets:
            sock.close()


def open_endpoint(
    host: str,
    port: int,
    *,
    keyfile: str | None = None,
    certfile: str | None = None,
    token: str | None = None,
    allow_plain_http: bool = False,
    allowed_hosts: Iterable[str] = (),
) -> Endpoint:
    """Bind a monitor's sockets on ``host``:``port`` (0: a free port).

    ``host`` '' (dispy's "all interfaces") serves 127.0.0.1 unless TLS or
    ``allow_plain_http`` is given; any other address not on loopback needs one of
    them (the token would cross the network in clear text). Raises
    `ConfigurationError` saying what to change.
    """
    ssl_context = server_ssl_context(keyfile, certfile)
    if host == "" and ssl_context is None and not allow_plain_http:
        logger.warning(
            "web monitor: host='' (all interfaces) would send its token in clear "
            "text over the network: serving 127.0.0.1 only. Give certfile/keyfile "
            "for HTTPS, or allow_plain_http=True, to serve other machines"
        )
        host = "127.0.0.1"
    if not is_loopback(host) and ssl_context is None and not allow_plain_http:
        raise ConfigurationError(
            f"host {host!r} makes the monitor reachable from other machines: "
            "give certfile/keyfile for HTTPS, or allow_plain_http=True to accept "
            "that the token travels in clear text"
        )
    token = check_token(token) if token is not None else new_token()
    try:
        sockets = bind_listening(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:  # its text names nodes and schedulers
            raise ConfigurationError(
                f"cannot listen on {host or '*'} port {port}: it is in use, most "
                "likely by another web monitor (of another script or notebook); "
                "shut that one down, or give another port= (port=0 picks a free one)"
            ) from exc
        raise ConfigurationError(
            f"cannot listen on {host or '*'} port {port}: {exc.strerror or exc}; "
            "pick another port (port=0 picks a free one)"
        ) from exc
    bound: int = sockets[0].getsockname()[1]
    guard = Guard.create(token, host, bound, ssl_context is not None, allowed_hosts)
    return Endpoint(sockets, guard, ssl_context, host, bound)


def server_ssl_context(
    keyfile: str | None, certfile: str | None
) -> ssl.SSLContext | None:
    """An HTTPS server context from PEM files (None without ``certfile``)."""
    if certfile is None:
        if keyfile is not None:
            raise ConfigurationError(
                "keyfile needs certfile too (the server's certificate)"
            )
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the TLS certificate {certfile!r} / key {keyfile!r}: {exc}"
        ) from exc
    return context


__all__ = ["Endpoint", "open_endpoint", "server_ssl_context"]
