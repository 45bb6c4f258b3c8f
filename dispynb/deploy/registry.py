"""`Registrar`: the client's registration listener for launched nodes.

Launched nodes (``dispynb-node --register HOST:PORT``) connect here and prove that they
know the secret for a fresh nonce (`dispynb.protocol.registration`). A node that
proves it is reported as a `RegisteredNode` at the connection's source address; the
cluster then connects to it and authenticates it like a discovered node. Anybody else
gets a nonce and a closed connection: never a connection from the client.

Hostile peers: at most `MAX_PENDING_PER_SOURCE` registrations per source address and
`MAX_PENDING` in all are read at once, each must finish within ``timeout`` seconds and
512 bytes, and failures are logged once per source address (for the first
`MAX_REMEMBERED` addresses; then at debug level). A new registration beyond a limit
drops the oldest pending one of its address, or in all of the address with the most
pending, rather than being refused: an attacker holding every slot (a few addresses
suffice, or one on a node's own machine) would otherwise keep the nodes out for good,
while now it must open connections faster than a node completes its exchange (a round
trip) to keep one out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable

from dispynb.protocol.messages import PROTOCOL_VERSION
from dispynb.protocol.registration import (
    ACCEPTED,
    MAX_MESSAGE,
    REJECTED,
    RegistrationError,
    decode_registration,
    encode_challenge,
    new_challenge,
    verify,
)
from dispynb.transport.addressing import format_address
from dispynb.wording import counted

logger = logging.getLogger(__name__)

#: Registrations read at once, in all and per source address; more are closed unread.
MAX_PENDING = 256
MAX_PENDING_PER_SOURCE = 8
#: Seconds a node has to answer the challenge.
REGISTER_TIMEOUT = 10.0
#: Source addresses whose failures are remembered (for logging once each).
MAX_REMEMBERED = 1024


@dataclasses.dataclass(frozen=True, slots=True)
class RegisteredNode:
    """A node that registered with a valid proof: it listens on ``host:port``."""

    host: str
    port: int
    name: str
    cpus: int
    boot: bytes

    @property
    def spec(self) -> str:
        """``'host:port'``: a node spec for ``JobCluster(nodes=...)``."""
        return format_address(self.host, self.port)


@dataclasses.dataclass(slots=True)
class _Pending:
    """A registration being read: its connection, and when it came (loop time)."""

    writer: asyncio.StreamWriter
    since: float
    #: Dropped to make room for a newer registration (its connection aborted).
    dropped: bool = False


class Registrar:
    """Listens for node registrations (TCP) on the running event loop.

    Parameters
    ----------
    secret:
        The cluster's secret: registrations must prove they know it.
    on_registered:
        Called (on the loop) with each node that registered with a valid proof.
    host, port:
        Where to listen (default: every IPv4 and IPv6 address, one free port for
        both; an IPv6 address such as ``'::1'`` listens on IPv6 only).
    timeout:
        Seconds a node has to complete its registration.
    secret_name:
        What the log calls ``secret`` when it refuses a node that does not prove
        it (a scheduler's: its node secret, and the option that gives it).
    """

    def __init__(
        self,
        secret: bytes,
        on_registered: Callable[[RegisteredNode], None],
        *,
        host: str | None = None,
        port: int = 0,
        timeout: float = REGISTER_TIMEOUT,
        secret_name: str = "this cluster's secret",
    ) -> None:
        if not secret:
            raise ValueError("node registration needs a secret")
        self._secret = secret
        self._secret_name = secret_name
        self._on_registered = on_registered
        self.host = host
        self.port = port
        self.timeout = timeout
        self._servers: list[asyncio.Server] = []
        self._pending = 0  # registrations being read, in all
        # ... by source address, oldest first (a source is dropped when it has none)
        self._pending_by_source: dict[str, collections.deque[_Pending]] = {}
        self._warned: set[str] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closed = False
        # The boot id last accepted per node address: a repeat of it is not news
        # (nodes register again while they have no session), a new one is (the
        # node restarted). One entry per address, however often nodes restart.
        self._boots: dict[tuple[str, int], bytes] = {}

    async def start(self) -> int:
        """Start listening; return the bound port."""
        first = "0.0.0.0" if self.host is None else self.host
        server = await asyncio.start_server(
            self._handle, first, self.port, limit=MAX_MESSAGE + 2
        )
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        if self.host is None:
            # The same port on IPv6 too (asyncio makes it IPv6-only), so a node
            # told an IPv6 address of this machine reaches it; none without IPv6.
            try:
                server = await asyncio.start_server(
                    self._handle, "::", self.port, limit=MAX_MESSAGE + 2
                )
            except OSError as exc:
                logger.debug("no IPv6 registration listener: %s", exc)
            else:
                self._servers.append(server)
        logger.info(
            "listening for node registrations on %s",
            format_address(self.host or "*", self.port),
        )
        return self.port

    def forget(self, host: str, port: int) -> None:
        """Report the node at ``host:port`` again when it next registers, even from
        the same boot (its owner forgot it: it was unreachable too long)."""
        self._boots.pop((host, port), None)

    def close(self) -> None:
        """Stop listening and drop the registrations being read; idempotent."""
        self._closed = True
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for ip, queue in list(self._pending_by_source.items()):
            for _ in range(len(queue)):
                self._drop_oldest(ip)

    async def wait_closed(self) -> None:
        """Wait (after `close`) until the registrations being read have ended."""
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        queue = self._pending_by_source.get(ip)
        if queue is not None and len(queue) >= MAX_PENDING_PER_SOURCE:
            self._drop_oldest(ip)
        elif self._pending >= MAX_PENDING:
            self._drop_oldest(self._most_pending())
        entry = _Pending(writer, asyncio.get_running_loop().time())
        self._pending_by_source.setdefault(ip, collections.deque()).append(entry)
        self._pending += 1
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        try:
            await asyncio.wait_for(
                self._register(ip, entry, reader, writer), self.timeout
            )
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            if self._closed:
                logger.debug("registration from %s dropped: listener closed", ip)
            elif entry.dropped:
                self._refuse(
                    ip,
                    f"dropped for a newer registration ({MAX_PENDING_PER_SOURCE} "
                    f"pending from one address, or {MAX_PENDING} in all)",
                )
            else:
                self._refuse(ip, f"no complete registration ({type(exc).__name__})")
        except RegistrationError as exc:
            self._refuse(ip, str(exc))
        finally:
            self._settle(ip, entry)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _most_pending(self) -> str:
        """The source address with the most pending registrations (on a tie, the one
        pending longest)."""
        return max(
            self._pending_by_source,
            key=lambda ip: (
                len(self._pending_by_source[ip]),
                -self._pending_by_source[ip][0].since,
            ),
        )

    def _drop_oldest(self, ip: str) -> None:
        """Abort the oldest pending registration from ``ip`` (its handler then ends
        and logs it), making room for a new one."""
        entry = self._pending_by_source[ip][0]
        self._settle(ip, entry)
        entry.dropped = True
        entry.writer.transport.abort()

    def _settle(self, ip: str, entry: _Pending) -> None:
        """``entry`` is no longer pending (done, failed or dropped); idempotent."""
        queue = self._pending_by_source.get(ip)
        if queue is None or entry not in queue:
            return
        queue.remove(entry)
        self._pending -= 1
        if not queue:
            del self._pending_by_source[ip]

    async def _register(
        self,
        ip: str,
        entry: _Pending,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        challenge = new_challenge()
        writer.write(encode_challenge(challenge))
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        if size > MAX_MESSAGE:
            raise RegistrationError(f"message of {size} bytes over {MAX_MESSAGE}")
        reg = decode_registration(await reader.readexactly(size))
        if not verify(self._secret, challenge.nonce, reg):
            writer.write(REJECTED)
            await writer.drain()
            raise RegistrationError(
                f"wrong proof: the node does not have {self._secret_name}"
            )
        self._settle(ip, entry)  # proven: never dropped for another one now
        if reg.version != PROTOCOL_VERSION:
            writer.write(REJECTED)
            await writer.drain()
            raise RegistrationError(
                f"node speaks protocol {reg.version}, this client {PROTOCOL_VERSION}"
            )
        writer.write(ACCEPTED)
        await writer.drain()
        if self._boots.get((ip, reg.port)) == reg.boot:
            return
        self._boots[(ip, reg.port)] = reg.boot
        node = RegisteredNode(ip, reg.port, reg.name, reg.cpus, reg.boot)
        cpus = counted(reg.cpus, "CPU")
        logger.info("node %s registered at %s (%s)", reg.name, node.spec, cpus)
        try:
            self._on_registered(node)
        except Exception:
            logger.exception("registration callback failed for %s", node.spec)

    def _refuse(self, ip: str, reason: str) -> None:
        if ip in self._warned or len(self._warned) > MAX_REMEMBERED:
            logger.debug("registration from %s refused: %s", ip, reason)
            return
        self._warned.add(ip)
        if len(self._warned) > MAX_REMEMBERED:
            # Addresses without end (an IPv6 /64): the log must not follow them.
            logger.warning(
                "registrations refused from more than %d addresses: the next ones "
                "are logged at debug level only",
                MAX_REMEMBERED,
            )
            return
        logger.warning("registration from %s refused: %s", ip, reason)
