"""One user of a shared scheduler opens session after session.

Each session a user opens holds one of the scheduler's descriptors (its connection)
for as long as the user likes, whether it sets anything up or not. The scheduler
bounds what one user holds (CPUs, queued jobs, computations, files), but sessions
were not: one user who opened as many as the scheduler could hold left the others
no descriptor, so they could not even connect.
"""

from __future__ import annotations

import asyncio
import collections
import os
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from dispynb.errors import DispynbError
from dispynb.protocol.messages import Error
from dispynb.transport.connection import Connection
from dispynb.transport.tlslink import cut_closing_tls_links
from tests.hostile.test_scheduler import (
    _alices_jobs,
    alices_jobs_meanwhile,
    people,
    shared_nodes,
)
from tests.sharedsched.harness import raw_scheduler_session
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow

__all__ = ["people"]  # the fixture

#: The scheduler's descriptor limit, and the sessions the attacker opens.
NOFILE = 256
SESSIONS = 300
#: The scheduler's limit of sessions per user, in this test.
QUOTA = 8
#: Seconds a connection may take (the scheduler out of descriptors never answers).
CONNECT = 5.0


async def _open_sessions(port: int, credential: Path) -> tuple[list[Connection], str]:
    """Open `SESSIONS` authenticated sessions, 8 at a time; return those held and
    the first refusal (an error the scheduler sent, or why connecting failed)."""
    refusals: list[str] = []
    gate = asyncio.Semaphore(8)  # the listener's handshakes per source at once

    async def one() -> Connection | None:
        async with gate:
            try:
                async with asyncio.timeout(CONNECT):
                    conn = await raw_scheduler_session(port, credential)
            except (DispynbError, OSError) as exc:  # TimeoutError too
                refusals.append(f"{type(exc).__name__}: {exc}")
                return None
        try:  # a session the scheduler refuses gets an error, then its end
            async with asyncio.timeout(0.5):
                message, _ = await conn.recv()
        except TimeoutError:
            return conn  # held open: a session the scheduler serves
        except DispynbError as exc:
            refusals.append(f"{type(exc).__name__}: {exc}")
        else:
            if not isinstance(message, Error):
                return conn
            refusals.append(message.message)
        conn.close()
        return None

    opened = await asyncio.gather(*(one() for _ in range(SESSIONS)))
    return [conn for conn in opened if conn is not None], (refusals or [""])[0]


async def _attack(
    port: int, address: str, people: dict[str, Path]
) -> tuple[int, str, list[int] | str, str]:
    held, refusal = await _open_sessions(port, people["mallory"])
    try:
        alices = await alices_jobs_meanwhile(address, people["alice"])
        try:  # mallory's own cluster, one session over her quota
            await asyncio.wait_for(
                asyncio.to_thread(_alices_jobs, address, people["mallory"]), 60
            )
            cluster = "ran"
        except Exception as exc:
            cluster = f"{type(exc).__name__}: {exc}"
        return len(held), refusal, alices, cluster
    finally:
        for conn in held:
            conn.close()


@pytest.mark.attack(
    id="sched-session-hoard",
    title=f"One user of a scheduler at {NOFILE} descriptors opens {SESSIONS} "
    f"sessions and holds them (--max_sessions {QUOTA})",
    goal=f"{QUOTA} held, the others refused saying the limit and the option; "
    "another user's jobs run (was: 247 held, every descriptor taken, the other "
    "user's connect timed out)",
)
@pytest.mark.timeout(180)
def test_one_user_cannot_hold_every_session(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(
        tmp_path, people, "--max_sessions", str(QUOTA), nofile=NOFILE
    ) as sched:
        held, refusal, alices, cluster = asyncio.run(
            _attack(sched.port, sched.address, people)
        )
    measure(
        f"{held} sessions held, {SESSIONS - held} refused ({refusal[:90]!r}); "
        f"her cluster then: {cluster[:60]}...; alice's jobs: {alices}"
    )
    assert alices == [0, 1, 4, 9]
    assert held == QUOTA and "--max_sessions" in refusal
    assert cluster.startswith("SetupError") and "--max_sessions" in cluster


#: Times the user over her quota sets up a computation of `LARGE` bytes.
TRIES = 8
LARGE = 20 << 20


@pytest.mark.attack(
    id="sched-session-refusal-reset",
    title=f"A user at her --max_sessions sets up a computation of {LARGE >> 20} MB, "
    f"{TRIES} times (the scheduler refuses the session and closes while it arrives), "
    "over plain TCP and over TLS",
    goal="each time SetupError naming --max_sessions (was: about half 'Broken pipe' "
    "or 'Connection reset by peer'; over TLS 7 of 8 'connection closed')",
)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.timeout(120)
def test_a_refused_session_is_told_why_while_it_sends(
    tmp_path: Path, people: dict[str, Path], measure, tls: bool
) -> None:
    """Over TLS the scheduler's Welcome, its refusal and its close_notify could all
    come in one read: the link had ended before the client wrote its computation,
    and that write's 'connection closed' hid the refusal already received."""
    blob = os.urandom(LARGE)

    def compute(n: int) -> int:
        return len(blob) + n

    told: collections.Counter[str] = collections.Counter()
    args: tuple[str, ...] = ("--max_sessions", "1")
    cafile = None
    if tls:
        cafile, key = make_cert(tmp_path, "scheduler")
        args += ("--cluster_certfile", cafile, "--cluster_keyfile", key)
    with shared_nodes(tmp_path, people, *args) as sched:
        loop = asyncio.new_event_loop()
        held = loop.run_until_complete(
            raw_scheduler_session(sched.port, people["mallory"], cafile=cafile)
        )
        try:
            for _ in range(TRIES):
                try:
                    with SharedJobCluster(
                        compute,
                        scheduler_host=sched.address,
                        secret_file=str(people["mallory"]),
                        cafile=cafile,
                    ) as cluster:
                        cluster.submit(1)()
                    told["ran"] += 1
                except DispynbError as exc:
                    said = "--max_sessions" if "--max_sessions" in str(exc) else exc
                    told[f"{type(exc).__name__}: {said}"] += 1
        finally:
            held.close()
            # (a TLS shutdown needs the loop running: cut it; asyncio then closes
            # the socket in a callback)
            cut_closing_tls_links(loop)
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
    said = ", ".join(f"{count} x {what}" for what, count in told.items())
    measure(f"{'TLS' if tls else 'plain'}: {said}")
    assert told == {"SetupError: --max_sessions": TRIES}
