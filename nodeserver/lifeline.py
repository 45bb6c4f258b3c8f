"""What ends a running node other than a signal: its parent exits
(``--exit-with-parent``, ``--parent-pipe``), its launcher closes it, it cannot
register (``--register``), or no client came for long (``--exit-without-client``).
Each is a task (or a reader) that sets the node's ``stop`` event
(`nodeserver.cli.serve`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypedDict

from dispynb.errors import DispynbError
from nodeserver.register import (
    CLIENT,
    REREGISTER_INTERVAL,
    keep_registered,
    register,
)

if TYPE_CHECKING:
    from nodeserver.config import NodeConfig
    from nodeserver.server import NodeServer

logger = logging.getLogger("nodeserver")

#: Seconds between checks that the parent of an ``--exit-with-parent`` node lives.
PARENT_CHECK_INTERVAL = 1.0

#: Seconds ``--exit-without-client`` retries a client that does not accept the
#: node's registration again before it counts the client as gone.
CLIENT_CHECK_PATIENCE = 10.0


async def stop_when_orphaned(
    parent: int, orphaned: asyncio.Event, stop: asyncio.Event
) -> None:
    """Set ``orphaned`` and ``stop`` once ``parent`` is this node's parent no more
    (``--exit-with-parent``)."""
    # A killed parent cannot tell us; its pid changing (re-parenting) can.
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_CHECK_INTERVAL)
    logger.warning("the process that started this node exited; stopping")
    orphaned.set()
    stop.set()


#: What a launcher writes on a node's ``--parent-pipe`` before it closes it on
#: purpose (`SSHNodes.close`): the end of file that follows is no dead parent.
CLOSING = b"stop\n"


def stop_at_eof(
    fd: int, orphaned: asyncio.Event, stop: asyncio.Event, closed: list[bool]
) -> Callable[[], None]:
    """Watch ``fd`` (a pipe whose write end the parent holds); stop at its EOF,
    saying its launcher closed it (``closed`` gets True) if `CLOSING` came first.

    Returns the function that stops watching."""
    loop = asyncio.get_running_loop()
    seen = b""

    def readable() -> None:
        nonlocal seen
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            seen = (seen + data)[-len(CLOSING) :]
            return  # only the end of file stops the node
        loop.remove_reader(fd)
        if seen == CLOSING:
            closed.append(True)
            logger.info("its launcher closed it; stopping")
        else:
            logger.warning("the process that started this node exited; stopping")
        orphaned.set()
        stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)

    def unwatch() -> None:
        loop.remove_reader(fd)

    return unwatch


async def exit_without_client(
    server: NodeServer,
    seconds: float,
    ready: asyncio.Event,
    stop: asyncio.Event,
    client_lives: Callable[[], Awaitable[bool]] | None = None,
    peer: str = CLIENT,
) -> None:
    """Set ``stop`` once no client session has been up for ``seconds`` (and
    ``client_lives``, if given, says the launcher's client is gone; ``peer``: what
    the log calls it, a client or the scheduler).

    The clock starts when ``ready`` is set (listening, or registered with the
    launcher's client) and restarts when the last session ends; a session that came
    and went between two checks still counts (`NodeServer.last_client_left`).
    """
    await ready.wait()
    tick = min(1.0, seconds / 10)
    alone_since = time.monotonic()
    while True:
        now = time.monotonic()
        if server.sessions:
            alone_since = now
        elif server.last_client_left is not None:
            alone_since = max(alone_since, server.last_client_left)
        if now - alone_since >= seconds:
            if client_lives is None:
                break
            # A client may have connected while the check ran: it keeps the node.
            if not await client_lives() and not server.sessions:
                break
            alone_since = time.monotonic()  # its launcher lives: ask again later
            continue
        await asyncio.sleep(min(tick, alone_since + seconds - now))
    logger.warning(
        "no client connected for %g s (--exit-without-client)%s: stopping",
        seconds,
        "" if client_lives is None else f" and {peer} it registered with is gone",
    )
    stop.set()


async def register_and_stay(
    server: NodeServer,
    config: NodeConfig,
    address: str,
    stop: asyncio.Event,
    registered: asyncio.Event,
    boot: bytes,
    patience: float | None,
    failed: list[DispynbError],
    peer: str = CLIENT,
) -> None:
    """Register with the client at ``address`` (stop if it rejects the node, or
    does not answer within ``patience`` seconds: the error goes to ``failed``),
    then keep registered for ever. ``peer``: what the log calls that client."""
    identity = _identity(server, config, boot)
    try:
        ip = await register(address, patience=patience, peer=peer, **identity)
    except DispynbError as exc:
        logger.error("%s; stopping", exc)
        failed.append(exc)
        stop.set()
        return
    registered.set()
    await keep_registered(
        address,
        **identity,
        first_ip=ip,
        # dispynode's --ping_interval: how often a node without its scheduler
        # announces itself to it.
        interval=config.announce_interval or REREGISTER_INTERVAL,
        # Not listening (outside its service window): no client could connect.
        live_session=lambda ips, within: (
            not server.listening or server.heard_from(ips, within)
        ),
        peer=peer,
    )


async def still_registered(
    server: NodeServer,
    config: NodeConfig,
    address: str,
    boot: bytes,
    peer: str = CLIENT,
) -> bool:
    """Whether the client this node registered with still accepts it (registering
    again with the same boot id: the client does not report the node twice)."""
    identity = _identity(server, config, boot)
    try:
        await register(address, patience=CLIENT_CHECK_PATIENCE, peer=peer, **identity)
    except DispynbError as exc:
        logger.info("%s this node registered with is gone: %s", peer, exc)
        return False
    return True


class _Identity(TypedDict):
    """What a node registers as (`register`'s and `keep_registered`'s keywords)."""

    secret: bytes
    name: str
    port: int
    cpus: int
    boot: bytes


def _identity(server: NodeServer, config: NodeConfig, boot: bytes) -> _Identity:
    assert config.secret is not None
    return _Identity(
        secret=config.secret,
        name=config.name,
        port=server.port,
        cpus=config.cpus,
        boot=boot,
    )


__all__ = [
    "CLOSING",
    "exit_without_client",
    "register_and_stay",
    "still_registered",
    "stop_at_eof",
    "stop_when_orphaned",
]
