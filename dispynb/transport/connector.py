"""`connect`: open an authenticated connection to a node server."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import random
import resource
import socket
import ssl

from dispynb.defaults import CONNECT_RETRY, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT
from dispynb.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosedError,
    ConnectTimeoutError,
    NodeBusyError,
    NodeNotServingError,
    ProtocolError,
    TransportError,
)
from dispynb.protocol.handshake import TLS_REFUSED
from dispynb.protocol.messages import Welcome
from dispynb.secret import (
    MIN_SECRET_BITS,
    check_strength,
    estimate_bits,
    split_credential,
)
from dispynb.transport import localsockets
from dispynb.transport.addressing import format_address
from dispynb.transport.connection import Connection
from dispynb.transport.handshake import client_handshake
from dispynb.transport.peeruser import peer_uid
from dispynb.transport.tls import CLIENT_TLS, TlsOptions, handshake_refusal
from dispynb.transport.tlsaccept import BUSY_ALERT

logger = logging.getLogger(__name__)

#: Seconds before the first retry of a refused connection; doubled up to the maximum.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0


async def connect(
    host: str,
    port: int,
    *,
    secret: bytes | None,
    max_message_size: int,
    ssl_context: ssl.SSLContext | None = None,
    name: str = "",
    timeout: float = CONNECT_TIMEOUT,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    retry_for: float = CONNECT_RETRY,
    tls_options: TlsOptions = CLIENT_TLS,
    server: str = "",
) -> tuple[Connection, Welcome]:
    """Connect and authenticate to the node at ``host:port``.

    A node that refuses the connection as busy (too many connections in their
    handshake) is tried again with a growing delay (jittered, 0.05 s doubling up to
    1 s) for up to ``retry_for`` seconds. A secret is proved to a node on another
    host only if it is strong (`dispynb.secret.check_strength`): whoever listens
    there gets the proof, and could test guesses of a weak secret against it.
    ``tls_options``: how the caller's user gives TLS settings, named in the fixes
    TLS errors suggest (a Python client's keywords by default); ``server``: the
    program expected there, for messages (default: ``dispynb-scheduler`` when the
    secret is a user's credential, else ``dispynb-node``).

    Raises
    ------
    ConnectTimeoutError
        The TCP connect or the handshake took too long.
    ConnectionClosedError
        Nothing accepts connections there, or it hung up (`NodeBusyError`: it kept
        refusing the connection as busy for ``retry_for`` seconds).
    AuthenticationError
        The node does not share our secret, or our secret is too weak to prove to a
        node on another host.
    ProtocolError
        The peer is not a dispynb node, or runs another protocol version.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for
    delay = RETRY_FIRST
    user, secret = split_credential(secret)
    name = user or name  # a shared scheduler finds the user's key by this name
    while True:
        try:
            return await _connect_once(
                host,
                port,
                secret=secret,
                max_message_size=max_message_size,
                ssl_context=ssl_context,
                name=name,
                user=user,
                timeout=timeout,
                handshake_timeout=handshake_timeout,
                tls=tls_options,
                server=server,
            )
        except NodeBusyError as exc:
            wait = delay * random.uniform(0.5, 1.0)
            if loop.time() + wait > deadline:
                raise NodeBusyError(
                    f"{exc}; still refused after retrying for {retry_for:g} s"
                ) from exc
            logger.debug("%s; retrying in %.2f s", exc, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, RETRY_MAX)


#: What a connection failing with each of these errors means, and what to check.
_NO_ROUTE = {
    errno.EHOSTUNREACH: (
        "no machine answers at that address (no route to host): check that the "
        "address is right and that the machine is up and on this network"
    ),
    errno.EHOSTDOWN: (
        "the machine at that address is down (host is down): start it, or check "
        "the address"
    ),
    errno.ENETUNREACH: (
        "this machine has no route to that address (network is unreachable): "
        "check the address, and this machine's network connection"
    ),
}


def _names_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost`` (a name is not
    resolved again for a message: only its spelling counts)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _timed_out(
    peer: str, port: int, timeout: float, server: str, *, tls_started: bool
) -> str:
    """What a connection that did not complete within ``timeout`` tells its user."""
    if tls_started:  # the machine completed the TCP handshake: something listens
        return (
            f"{peer} accepted the connection but did not complete the TLS handshake "
            f"in {timeout:g} s: the process there is stopped (SIGSTOP, Ctrl-Z, a "
            f"suspended batch job), too busy to answer, or no {server}"
        )
    return (
        f"connecting to {peer} timed out after {timeout:g} s: nothing answered "
        "there, so the machine is down or unreachable from here, or a firewall "
        f"drops connections to port {port}; check the address, that the machine "
        f"is up, and that its firewall lets {server} connections in"
    )


def out_of_descriptors(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or the error it was raised from) is this process's (or the
    system's) descriptor limit: a connection worth trying again later."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return True
        exc = exc.__cause__
    return False


#: Errors of a connection to a machine where no node listens yet (or any more):
#: refused (the machine is up, the node not yet), or no route to it (booting).
_NOT_LISTENING = (
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.EHOSTDOWN,
    errno.ENETUNREACH,
)


def not_listening(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or the error it was raised from) says nothing listens at
    the address, or a node there takes no new clients (``--serve N`` reached): a
    node that may be starting, or restarted, worth trying again later (a name that
    does not resolve, a wrong secret or TLS are not)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _NOT_LISTENING:
            return True
        if isinstance(exc, NodeNotServingError):
            return True
        exc = exc.__cause__
    return False


def _nofile() -> int | str:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "none" if soft == resource.RLIM_INFINITY else soft


async def _connect_once(
    host: str,
    port: int,
    *,
    secret: bytes | None,
    max_message_size: int,
    ssl_context: ssl.SSLContext | None,
    name: str,
    user: str,
    timeout: float,
    handshake_timeout: float,
    tls: TlsOptions,
    server: str,
) -> tuple[Connection, Welcome]:
    peer = format_address(host, port)
    # Only a shared scheduler is proved a user's credential.
    server = server or ("dispynb-scheduler" if user else "dispynb-node")
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            sock = await _open_local(host, port) if ssl_context is None else None
            if sock is None:
                sock = await open_socket(host, port)
            _check_secret_for(sock, secret, peer)
            if ssl_context is None:
                conn = Connection.over_socket(sock, peer)
            else:
                conn = await Connection.over_tls(
                    sock, peer, ssl_context, server_side=False, server_hostname=host
                )
    except TimeoutError:
        raise ConnectTimeoutError(
            _timed_out(peer, port, timeout, server, tls_started=sock is not None)
        ) from None
    except TransportError as exc:
        if isinstance(exc, ConnectionClosedError):
            raise ConnectionClosedError(
                f"cannot connect to {peer}: {exc}; is {server} running there?"
            ) from exc
        if BUSY_ALERT in str(exc):  # a TLS node refusing it at accept, for now
            raise NodeBusyError(
                f"node {peer} refused the connection for now: too many connections "
                "are in their handshake, or too many failed from this address"
            ) from exc
        if _PLAIN_ANSWER in str(exc):  # bytes that are no TLS: a plain server's
            who = "node" if server == "dispynb-node" else server
            raise TransportError(
                f"{who} {peer} answered without TLS: it does not use TLS; "
                f"{tls.turn_off()}, or start {_TLS[server]} [{exc}]"
            ) from exc
        # A failed TLS handshake is a TLS failure, not "nothing there".
        uses = "the node use TLS"
        if server == "dispynb-scheduler":
            uses = "dispynb-scheduler use TLS (--cluster_certfile)"
        raise TransportError(
            f"{exc}; does {uses}, with a certificate that this client trusts "
            f"({tls.cafile.rstrip('=')})?"
        ) from exc
    except OSError as exc:
        if out_of_descriptors(exc):
            raise ConnectionClosedError(
                f"cannot connect to {peer}: this client is out of file descriptors "
                f"({exc.strerror}, limit {_nofile()}): it tries again as they free; "
                "raise the limit (ulimit -n) or give fewer nodes"
            ) from exc
        if isinstance(exc, socket.gaierror):  # nothing to ask of a server there
            raise ConnectionClosedError(
                f"cannot connect to {peer}: cannot resolve host name {host!r} "
                f"({exc.strerror}): check its spelling, or give its IP address"
            ) from exc
        reason = str(exc)
        if exc.errno in _NO_ROUTE:
            # The errno's text is "Connect call failed (address)": say what it means.
            raise ConnectionClosedError(
                f"cannot connect to {peer}: {_NO_ROUTE[exc.errno]}"
            ) from exc
        if isinstance(exc, ConnectionRefusedError):
            # The errno's text repeats the address: say what it means, and (for a
            # node) how to name one that runs on another port.
            named = peer.rsplit(":", 1)[0]  # the host, in brackets for IPv6
            other = f"; a node started with --port N is named '{named}:N'"
            if not _names_loopback(host):  # the first cross-machine mistake
                other += (
                    "; one started without a secret listens on 127.0.0.1 only: "
                    "give it DISPYNB_SECRET or --secret-file"
                )
            reason = (
                f"nothing listens on port {port} there (connection refused"
                f"{other if server == 'dispynb-node' else ''})"
            )
        raise ConnectionClosedError(
            f"cannot connect to {peer}: {reason}; is {server} running there?"
        ) from exc
    try:
        async with asyncio.timeout(handshake_timeout):
            welcome = await client_handshake(conn, secret, max_message_size, name, user)
    except TimeoutError:
        conn.abort()
        # The kernel completed the TCP handshake: something listens there.
        raise ConnectTimeoutError(
            f"{peer} accepted the connection but did not complete the dispynb "
            f"handshake in {handshake_timeout} s: the process there is stopped "
            "(SIGSTOP, Ctrl-Z, a suspended batch job), too busy to answer, or no "
            f"{server} (with TLS if the {_ROLE[server]} uses TLS)"
        ) from None
    except (
        ProtocolError,
        AuthenticationError,
        NodeBusyError,
        NodeNotServingError,
    ) as exc:
        conn.abort()
        raise type(exc)(f"{peer}: {exc}") from exc
    except TransportError as exc:
        conn.abort()
        if ssl_context is None:
            if isinstance(exc, ConnectionClosedError):
                raise
            if server == "dispynb-scheduler" and str(exc).startswith(TLS_REFUSED):
                # The listener's words are a node's; a scheduler's TLS is its own.
                raise TransportError(
                    f"{peer}: dispynb-scheduler uses TLS (--cluster_certfile), this "
                    f"client does not: {tls.turn_on_scheduler()}"
                ) from exc
            if str(exc).startswith(TLS_REFUSED):  # the node's words are a client's
                raise TransportError(
                    f"{peer}: {TLS_REFUSED}: {tls.turn_on('node')}"
                ) from exc
            raise TransportError(f"{peer}: {exc}") from exc
        # A TLS node refusing our certificate (or its absence) hangs up here.
        raise handshake_refusal(peer, ssl_context, exc, tls) from exc
    except BaseException:
        conn.abort()
        raise
    return conn, welcome


#: What OpenSSL says of an answer to its ClientHello that is no TLS record.
_PLAIN_ANSWER = "WRONG_VERSION_NUMBER"

#: How each server is started with TLS, for a client that expected it.
#: What each server is called in a sentence.
_ROLE = {"dispynb-node": "node", "dispynb-scheduler": "scheduler"}

_TLS = {
    "dispynb-node": "the node with --certfile and --keyfile",
    "dispynb-scheduler": "dispynb-scheduler with --cluster_certfile and "
    "--cluster_keyfile",
}


async def _open_local(host: str, port: int) -> socket.socket | None:
    """The Unix socket of a node this process started at ``host:port``
    (`dispynb.transport.localsockets`), or None: then TCP."""
    path = localsockets.path_for(host, port)
    if path is None:
        return None
    try:
        return await localsockets.open_unix(path)
    except OSError as exc:
        logger.debug(
            "%s: no Unix socket (%s): over TCP", format_address(host, port), exc
        )
        return None


def _check_secret_for(sock: socket.socket, secret: bytes | None, peer: str) -> None:
    """Refuse to prove a weak secret where a stranger may listen: a node on another
    host, or a loopback port that another user of this machine listens on.

    A proof is a verifier of the secret it was made with: whoever receives one can
    test guesses against it offline. On loopback, any user of the machine can
    listen on a port a node is not using (yet, or any more), so a weak secret is
    proved there only to a process of this user (or root), as the node's own
    clients on its own host are.
    """
    if not secret or sock.family == getattr(socket, "AF_UNIX", None):
        return  # a Unix socket: the path's permissions choose who listens
    address = sock.getpeername()[0]
    where = f"to prove to {peer}, on another host"
    if ipaddress.ip_address(address.split("%", 1)[0]).is_loopback:
        if estimate_bits(secret) >= MIN_SECRET_BITS:
            return
        try:
            owner = peer_uid(sock)
        except OSError:  # out of descriptors: tried again later, as a connect is
            sock.close()
            raise
        if owner in (os.geteuid(), 0):
            return
        who = "a user it cannot tell" if owner is None else f"uid {owner}"
        where = (
            f"to prove to {peer}, which another user of this machine ({who}) listens "
            "on, not this user: a proof lets it test guesses of the secret offline"
        )
    try:
        check_strength(secret, where)
    except ConfigurationError as exc:
        sock.close()
        raise AuthenticationError(str(exc)) from None


async def open_socket(host: str, port: int) -> socket.socket:
    """A TCP socket connected to ``host:port``, trying each address it resolves to.

    Raises the first address's OSError when none accepts.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise errors[0] if errors else OSError(f"{host!r} resolves to no address")
