"""`Listener`: accepts TCP (or TLS) connections, and Unix-socket ones from clients
on this host (`dispynb.transport.localsockets`), authenticates them, hands them on."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from dispynb.defaults import HANDSHAKE_TIMEOUT
from dispynb.errors import (
    AuthenticationError,
    ConnectionClosedError,
    DispynbError,
    NodeNotServingError,
    TransportError,
)
from dispynb.protocol.framing import encode_frames
from dispynb.protocol.handshake import NodeHandshake, SecretSource, peer_text
from dispynb.protocol.messages import NOT_SERVING, Error, Welcome, pack_header
from dispynb.transport import localsockets
from dispynb.transport.addressing import (
    LISTEN_BACKLOG,
    bind_listening,
    format_address,
)
from dispynb.transport.admission import (
    LOG_PERIOD,
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_PER_SOURCE,
    Admission,
    Tally,
    source_of,
)
from dispynb.transport.connection import Connection, describe_error
from dispynb.transport.handshake import node_handshake
from dispynb.transport.peeruser import peer_uid
from dispynb.transport.tlsaccept import (
    BUSY_ALERT_RECORD,
    TLS_HANDSHAKE_RECORD,
    starts_tls,
)

__all__ = ["MAX_PENDING_HANDSHAKES", "MAX_PENDING_PER_SOURCE", "Handler", "Listener"]

logger = logging.getLogger(__name__)

#: Connections accepted per wake-up of a listening socket.
_ACCEPT_BATCH = 16

#: accept() errors that mean "out of a resource" (file descriptors, buffers): the
#: listener pauses instead of retrying at once, which would spin.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

#: Seconds before the first retry of a paused listener; doubled up to the maximum.
ACCEPT_RETRY_FIRST = 0.05
ACCEPT_RETRY_MAX = 1.0

#: Seconds without an out-of-descriptors accept before an episode counts as over.
#: An empty accept queue says nothing about descriptors: on a loaded machine the
#: clients that exhausted them may just be slow to send their next connections, and
#: the next one fails again. Without this, such an episode logged a pause and a
#: resume per lull (seen: two of each in one exhaustion under load).
EPISODE_QUIET = 2 * ACCEPT_RETRY_MAX

Handler = Callable[[Connection, str], Awaitable[None]]


class Listener:
    """Accepts connections; runs the handshake; calls ``handler(conn, client_name)``.

    ``own_user_only`` (a node without a secret, whose handshake anyone passes):
    connections from other users of this machine, or from users it cannot tell,
    are refused before the handshake (`dispynb.transport.peeruser`).

    A failed or slow handshake (over ``handshake_timeout``) closes that connection
    only; such failures are logged as counts per source address (`Tally`). The
    handler's own errors are logged and close only its connection. When accept fails
    for lack of file descriptors, the listener stops accepting and retries with a
    growing delay (one warning when it starts, one line with the count when it ends).

    ``server`` names what listens ("node", "scheduler") in the log's lines.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        secret: SecretSource,
        make_welcome: Callable[[], Welcome],
        max_message_size: int,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        admission: Admission | None = None,
        log_period: float = LOG_PERIOD,
        own_user_only: bool = False,
        server: str = "node",
    ) -> None:
        self._server = server
        self._ssl_context = ssl_context
        self._handler = handler
        self._secret = secret
        self._make_welcome = make_welcome
        self._max_message_size = max_message_size
        self._handshake_timeout = handshake_timeout
        self._own_user_only = own_user_only
        self.admission = admission or Admission()
        #: Why every new connection is refused (`refuse_all`); None: none is.
        self.refusal: str | None = None
        self._tally = Tally(logger, log_period)
        self._tasks: set[asyncio.Task[None]] = set()
        # Deadlines of the handshakes under way (None until started), by socket;
        # the sockets of those dropped to make room for newer ones.
        self._deadlines: dict[socket.socket, asyncio.Timeout | None] = {}
        self._dropped: set[socket.socket] = set()
        self._sockets: list[socket.socket] = []
        self._unix_paths: list[str] = []  # removed by stop
        self.port = 0
        # Out-of-descriptors episode: when it began, failed accepts, next delay.
        self._paused_since: float | None = None
        self._failed_accepts = 0
        self._retry_delay = ACCEPT_RETRY_FIRST
        self._retry: asyncio.TimerHandle | None = None
        self._last_failure = 0.0
        self._episode_check: asyncio.TimerHandle | None = None

    @property
    def _pending(self) -> int:
        """Connections in their handshake now."""
        return self.admission.pending

    def listen_on(self, host: str, port: int, option: str = "") -> int:
        """Bind and listen on ``host:port`` (0 picks a free port); return the port.

        Call it on the running loop, which then accepts the connections. A port in
        use raises OSError naming ``option``, the program's option for the port.
        """
        loop = asyncio.get_running_loop()
        sockets = bind_listening(host, port, option)
        for sock in sockets:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept, sock)
        self._sockets.extend(sockets)
        self.port = sockets[0].getsockname()[1]
        return self.port

    def listen_unix(self, path: str) -> None:
        """Also accept connections on the Unix socket ``path``, whose directory
        must be private (`dispynb.transport.localsockets`); removed by `stop`.

        Call it on the running loop. Its clients authenticate as TCP ones do.
        """
        loop = asyncio.get_running_loop()
        sock = localsockets.bind_unix(path, LISTEN_BACKLOG)
        loop.add_reader(sock.fileno(), self._accept, sock)
        self._sockets.append(sock)
        self._unix_paths.append(path)

    def stop(self) -> None:
        """Stop accepting connections (idempotent); accepted ones go on."""
        loop = asyncio.get_running_loop()
        paused = self._retry is not None  # its sockets are not watched meanwhile
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._episode_check is not None:
            self._episode_check.cancel()
            self._episode_check = None
        for sock in self._sockets:
            if not paused:
                loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()
        self._tally.close()

    def refuse_all(self, reason: str) -> None:
        """Go on listening, but refuse every new connection saying ``reason``
        (`NOT_SERVING`): a closed port would tell clients that no server runs.
        With TLS the refusal answers the client's hello inside TLS (a TLS client
        reads no plain one), within the handshake slots of `Admission`."""
        self.refusal = reason

    def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                self._caught_up()
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause(exc)
                else:
                    logger.warning("cannot accept a connection: %s", exc)
                return
            if not isinstance(address, tuple):  # a Unix socket's peer has no name
                address = (localsockets.UNIX_PEER, 0)
            source = source_of(address)
            if self.refusal is not None and self._ssl_context is None:
                self._tally.event("refused connections", source, self.refusal)
                _refuse(sock, self.refusal, code=NOT_SERVING)
                continue
            uid = _local_uid(sock, source)
            if uid is not None and uid != os.geteuid():
                # Another user of this machine: all its loopback addresses (a
                # /8 of them) count as one source, or it would pick a fresh one
                # for every few guesses of the secret (and could not be told
                # from the node's own user's clients on 127.0.0.1).
                source = f"local user {uid}"
            crowded = self.admission.crowded_out(source)
            if isinstance(crowded, socket.socket):
                self._drop_handshake(crowded)
            refusal = self.admission.admit(source, sock)
            if refusal is not None:
                self._tally.event("refused connections", source, refusal)
                if self._ssl_context is not None and _tls_first(sock):
                    _refuse_tls(sock)
                else:
                    _refuse(sock, refusal)
                continue
            self._deadlines[sock] = None
            task = loop.create_task(self._serve(sock, address, source, uid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _drop_handshake(self, sock: socket.socket) -> None:
        """End the pending handshake on ``sock`` now, to make room for a newer one:
        its slot is free at once, its task ends it as timed out."""
        self.admission.release(sock)
        self._dropped.add(sock)
        deadline = self._deadlines.get(sock)
        if deadline is not None:  # else its task sees it dropped when it starts
            deadline.reschedule(asyncio.get_running_loop().time())

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting; retry after a delay that grows."""
        loop = asyncio.get_running_loop()
        if self._paused_since is None:
            self._paused_since = time.monotonic()
            self._failed_accepts = 0
            self._retry_delay = ACCEPT_RETRY_FIRST
            logger.warning(
                "cannot accept connections (%s): pausing, retrying every %g s at most "
                "until descriptors are free again",
                exc.strerror or exc,
                ACCEPT_RETRY_MAX,
            )
        else:
            self._retry_delay = min(self._retry_delay * 2, ACCEPT_RETRY_MAX)
        self._failed_accepts += 1
        self._last_failure = time.monotonic()
        if self._retry is None:
            for sock in self._sockets:
                loop.remove_reader(sock.fileno())
            self._retry = loop.call_later(self._retry_delay, self._resume)

    def _resume(self) -> None:
        self._retry = None
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _caught_up(self) -> None:
        """Nothing more to accept: an out-of-descriptors episode, if any, ends once
        `EPISODE_QUIET` seconds pass with no accept short of descriptors."""
        if self._paused_since is None or self._episode_check is not None:
            return
        loop = asyncio.get_running_loop()
        self._episode_check = loop.call_later(EPISODE_QUIET, self._end_episode)

    def _end_episode(self) -> None:
        self._episode_check = None
        if self._paused_since is None:
            return
        quiet = time.monotonic() - self._last_failure
        if self._retry is not None or quiet < EPISODE_QUIET:  # short again meanwhile
            loop = asyncio.get_running_loop()
            wait = max(EPISODE_QUIET - quiet, ACCEPT_RETRY_FIRST)
            self._episode_check = loop.call_later(wait, self._end_episode)
            return
        logger.warning(
            "accepting connections again after %.1f s short of descriptors "
            "(%d accept attempts failed)",
            self._last_failure - self._paused_since,
            self._failed_accepts,
        )
        self._paused_since = None

    async def _serve(
        self,
        sock: socket.socket,
        address: tuple[str, int],
        source: str,
        uid: int | None,
    ) -> None:
        """Handshake, then run the handler for one connection."""
        peer = (
            format_address(str(address[0]), int(address[1]))
            if address[1]
            else str(address[0])
        )
        conn: Connection | None = None
        failure = ""
        handshake = NodeHandshake(self._secret)
        stranger = self._own_user_only and _stranger(uid)
        try:
            async with asyncio.timeout(self._handshake_timeout) as deadline:
                self._deadlines[sock] = deadline
                if sock in self._dropped:
                    raise TimeoutError
                if self._ssl_context is None:
                    if source != localsockets.UNIX_PEER:
                        await _expect_plain(sock, self._server)
                    conn = Connection.over_socket(sock, peer)
                else:
                    await _expect_tls(sock, self._server)
                    conn = await _accept_tls(
                        sock, peer, self._ssl_context, self._server
                    )
                    if self.refusal is not None:  # (plain ones: at accept)
                        await _answer_hello(conn, NOT_SERVING, self.refusal)
                if stranger:
                    await _answer_hello(conn, "auth", stranger)
                name = await node_handshake(
                    conn,
                    self._secret,
                    self._max_message_size,
                    self._make_welcome,
                    handshake,
                )
        except NodeNotServingError as exc:  # told why: no failure of the client
            self._tally.event("refused connections", source, str(exc))
            _abort(conn, sock)
            return  # (the finally clause releases its admission)
        except TimeoutError:
            if sock in self._dropped:
                failure = (
                    f"handshake dropped unfinished: all {self.admission.max_pending} "
                    "handshake slots were taken and it was the oldest of the address "
                    "holding the most"
                )
            else:
                failure = f"handshake timed out after {self._handshake_timeout:g} s"
        except ConnectionClosedError as exc:
            if source == localsockets.UNIX_PEER:
                # Only this user's own client reaches the Unix socket: a hang-up
                # there is that client closing while it connects, not an attack.
                logger.debug("%s hung up in the handshake: %s", peer, exc)
                _abort(conn, sock)
                return  # (the finally clause releases its admission)
            failure = peer_text(describe_error(exc))
        except DispynbError as exc:
            failure = peer_text(describe_error(exc))
        except OSError as exc:  # the node's own (no descriptor for its Welcome)
            failure = f"the {self._server} could not answer: {exc}"
        except BaseException:
            _abort(conn, sock)
            raise
        finally:
            self.admission.release(sock)
            self._deadlines.pop(sock, None)
            self._dropped.discard(sock)
        if failure:
            self.admission.failed(source)
            # Its address and port, and the name it gave if it said one (unproved,
            # but what tells an administrator which program or user is wrong).
            who = peer
            if handshake.client_name:
                who += f" (client {peer_text(handshake.client_name, 100)!r})"
            self._tally.event("rejected connections", source, failure, who)
            _abort(conn, sock)
            return
        assert conn is not None
        try:
            await self._handler(conn, name)
        except ConnectionClosedError:
            logger.debug("connection from %s closed", peer)
        except DispynbError as exc:
            logger.warning("connection from %s ended: %s", peer, describe_error(exc))
        except Exception:
            logger.exception("error serving %s", peer)
        finally:
            conn.close()


def _local_uid(sock: socket.socket, source: str) -> int | None:
    """The user of this machine a connection comes from (loopback or Unix socket),
    or None: from another machine, or it cannot be told (now: out of descriptors)."""
    if source != localsockets.UNIX_PEER:
        try:
            if not ipaddress.ip_address(source).is_loopback:
                return None
        except ValueError:  # an IPv6 /64: not loopback
            return None
    try:
        return peer_uid(sock)
    except OSError:  # no descriptor to ask with: refused as a stranger, for now
        return None


def _stranger(uid: int | None) -> str:
    """Why a node without a secret refuses a connection of local user ``uid``
    (None: it cannot tell), or "" if it is its own user. (Peers see 200
    characters of it.)"""
    own = os.geteuid()
    if uid == own:
        return ""
    who = "a user it cannot tell" if uid is None else _user_name(uid)
    return (
        f"this node has no secret: it serves only its own user {_user_name(own)}, "
        f"not {who}; give node and client the same secret (DISPYNB_SECRET, or "
        "--secret-file / secret_file=)"
    )


def _user_name(uid: int) -> str:
    try:
        import pwd  # POSIX only, as nodes are

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


async def _answer_hello(conn: Connection, code: str, reason: str) -> None:
    """Answer the client's hello with an error ``code`` saying ``reason``; raise
    `AuthenticationError` ('auth': a stranger) or `NodeNotServingError`
    (`NOT_SERVING`); the caller closes."""
    with contextlib.suppress(DispynbError):
        await conn.recv_unsigned_single()
        await conn.send(Error(code=code, message=reason))
    if code == NOT_SERVING:
        raise NodeNotServingError(reason)
    raise AuthenticationError(reason)


#: What a TLS node tells a client that does not speak TLS (in its own protocol).
TLS_REQUIRED = (
    "give the client cafile= (the CA that signed the node's certificate), and "
    "certfile= and keyfile= if the node checks clients' certificates (--cafile)"
)


async def _expect_tls(sock: socket.socket, server: str) -> None:
    """Before a TLS server's handshake: a client whose first bytes are no TLS is told
    that this server uses TLS (a TLS alert would mean nothing to it); raises
    `TransportError` then, `ConnectionClosedError` if it hung up at once."""
    tls = await starts_tls(sock)
    if tls is None:
        raise ConnectionClosedError("closed before its first message")
    if not tls:
        _refuse(sock, TLS_REQUIRED, code="tls")
        raise TransportError(f"a client without TLS (this {server} uses TLS): told so")


#: The option giving each kind of server its certificate (for the fix it logs).
_CERTFILE_OPTIONS = {"node": "--certfile", "scheduler": "--cluster_certfile"}


async def _accept_tls(
    sock: socket.socket, peer: str, context: ssl.SSLContext, server: str
) -> Connection:
    """The TLS handshake of a client that opened one. A client that hangs up in it
    (no alert: what Python's own TLS does when it does not trust the certificate)
    is named as such, not as an empty "connection failed: " (`ConnectionResetError`
    has no text)."""
    try:
        return await Connection.over_tls(sock, peer, context, server_side=True)
    except ConnectionClosedError as exc:
        cause = exc.__cause__
        detail = f" ({type(cause).__name__}: {cause})" if cause and str(cause) else ""
        option = _CERTFILE_OPTIONS.get(server, "certificate")
        raise ConnectionClosedError(
            f"the client hung up in the TLS handshake{detail}: it may not trust this "
            f"{server}'s certificate (its cafile= must hold the CA that signed the "
            f"{server}'s {option}, and the certificate name the address it "
            "connects to)"
        ) from exc


#: What a node without TLS tells a TLS client (which reads it as no TLS at all).
TLS_UNEXPECTED = (
    "this node does not use TLS: connect without cafile=, certfile= and keyfile=, "
    "or start the node with --certfile and --keyfile"
)


async def _expect_plain(sock: socket.socket, server: str) -> None:
    """Before a server's handshake without TLS: a client opening a TLS handshake is
    refused (it reads a reply that is no TLS, which its TLS library names) and
    logged as such, not as a frame of 369 MB; raises `TransportError` then,
    `ConnectionClosedError` if it hung up at once."""
    tls = await starts_tls(sock)
    if tls is None:
        raise ConnectionClosedError("closed before its first message")
    if tls:
        _refuse(sock, TLS_UNEXPECTED, code="tls")
        raise TransportError(f"a TLS client (this {server} does not use TLS): told so")


def _refuse(sock: socket.socket, reason: str, code: str = "busy") -> None:
    """Tell a peer refused at accept (or for want of TLS) why (best effort, never
    blocks), then close."""
    head, parts = encode_frames(
        [pack_header(Error(code=code, message=reason).to_header())]
    )
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(b"".join([head, *parts]))
        sock.shutdown(socket.SHUT_WR)
        # Closing with unread bytes (the peer's hello) would send a reset, which can
        # overtake the refusal: read what has arrived first (a bounded amount).
        for _ in range(16):
            if not sock.recv(4096):
                break
    with contextlib.suppress(OSError):
        sock.close()


def _tls_first(sock: socket.socket) -> bool:
    """Whether the peer's first byte, if any has come, opens a TLS handshake (or
    none has come yet: a TLS node's client is most likely a TLS client)."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        first = sock.recv(1, socket.MSG_PEEK)
        return not first or first[0] == TLS_HANDSHAKE_RECORD
    return True


def _refuse_tls(sock: socket.socket) -> None:
    """Refuse a TLS client at accept, as `_refuse` does a plain one, with the alert
    that a dispynb client reads as 'busy' (`BUSY_ALERT`): a dispynb frame would be
    no TLS to it ('the node does not use TLS')."""
    with contextlib.suppress(OSError):
        sock.send(BUSY_ALERT_RECORD)
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):  # no reset that could overtake the alert
            if not sock.recv(4096):
                break
    with contextlib.suppress(OSError):
        sock.close()


def _abort(conn: Connection | None, sock: socket.socket) -> None:
    if conn is not None:
        conn.abort()
    else:
        with contextlib.suppress(OSError):
            sock.close()
