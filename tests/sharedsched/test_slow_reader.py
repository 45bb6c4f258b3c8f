"""A client on a slow link: it takes what the scheduler sent slowly, pinging all
along.

The scheduler reads no more of a client that has not taken what was sent to it
(`SchedulerSession.serve`): its pings wait in its socket meanwhile. A client
catching up for longer than ``--zombie_interval`` was then taken for a zombie and
its jobs ended, though it read and pinged all the time. Real scheduler; a raw
client behind a proxy that passes on what the scheduler sends at a slow pace.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from dispynb.errors import DispynbError
from dispynb.protocol.messages import Error, Ping
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    unread_answers,
)
from tests.slowlink import slow_link

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: --zombie_interval in minutes: 3 s.
ZOMBIE_MINUTES = "0.05"
#: How long the client reads slowly (several intervals), and the pace of the link
#: to it: bytes every `PACE` s (about 400 KB/s).
SLOW_FOR = 12.0
CHUNK = 8192
PACE = 0.02


@pytest.fixture
def scheduler_args() -> tuple[str, ...]:
    """The `scheduler` fixture's: ``--zombie_interval`` of 3 s."""
    return ("--zombie_interval", ZOMBIE_MINUTES)


async def _catch_up_slowly(
    sched: SchedulerProcess, credential: Path
) -> tuple[list[Error], str]:
    """Send requests the scheduler answers until it reads no more; then take the
    answers through the slow link for `SLOW_FOR` s, pinging: the errors heard and
    the scheduler's log then. Then take nothing more, pinging, until the
    scheduler takes the client for a zombie."""
    frozen, stop = asyncio.Event(), asyncio.Event()
    links: list[asyncio.Task[Any]] = []
    proxy = await slow_link(sched.port, (frozen, stop), links, CHUNK, PACE)
    proxy_port = proxy.sockets[0].getsockname()[1]
    conn = await raw_scheduler_session(proxy_port, credential)
    errors: list[Error] = []
    try:
        await unread_answers(conn)  # the scheduler reads no more of it

        async def take() -> None:
            with contextlib.suppress(DispynbError):
                while True:
                    message, _ = await conn.recv()
                    if isinstance(message, Error) and message.code != "refused":
                        errors.append(message)
            errors.append(Error(code="closed", message="the scheduler closed"))

        async def ping() -> None:
            while True:
                conn.write(Ping())
                await asyncio.sleep(0.5)

        taking = asyncio.ensure_future(take())
        pinging = asyncio.ensure_future(ping())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(taking), SLOW_FOR)
        log = sched.log_text()
        frozen.set()  # pinging on: its pings wait unread behind the rest
        await asyncio.to_thread(sched.wait_for_log, "a zombie", timeout=30)
        pinging.cancel()
        taking.cancel()
        return errors, log
    finally:
        stop.set()
        conn.close()
        proxy.close()
        await asyncio.gather(*links)


def test_a_client_catching_up_slowly_is_no_zombie(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """Reading slowly for several --zombie_interval, it is no zombie; taking
    nothing more (stopped, cut off), it is one, its old pings waiting unread."""
    errors, log = asyncio.run(_catch_up_slowly(scheduler, users["alice"]))
    assert "a zombie" not in log, log
    assert not errors, errors
