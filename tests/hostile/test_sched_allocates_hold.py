"""A scheduler user sets a computation up with ``allocates`` (its client decides
each node's use) and never decides: its jobs wait, and other users' jobs are sent
ahead to the nodes as when they are alone. Real scheduler process, real nodes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from tests.hostile.test_scheduler import people, shared_nodes  # noqa: F401
from tests.hostile.tools import wait_for
from tests.sharedsched.harness import raw_scheduler_session, set_up_raw, submit_raw
from tests.sharedsched.nodeuse import held

pytestmark = pytest.mark.slow

#: Jobs of alice submitted while her first ones hold the nodes' 4 CPUs.
AHEAD = 12


def _undecided(
    port: int, credential: Path, ready: threading.Event, done: threading.Event
) -> None:
    """Mallory's raw client: an ``allocates`` computation with 100 jobs queued,
    which never says how it uses any node, until ``done``."""

    async def run() -> None:
        conn = await raw_scheduler_session(port, credential)
        try:
            await set_up_raw(conn, abs, name="undecided", allocates=True)
            submit_raw(conn, [(i,) for i in range(100)])
            ready.set()
            while not done.is_set():
                await asyncio.sleep(0.05)
        finally:
            conn.close()

    asyncio.run(run())


@pytest.mark.attack(
    id="sched-allocates-undecided",
    title="A scheduler user's computation with allocates never decides any node's "
    "use and keeps 100 jobs queued",
    goal=f"another user's {AHEAD} short jobs are all sent ahead to the nodes while "
    "her first 4 hold their CPUs, as when she is alone (was: one per CPU, as "
    "if in contention with jobs that can run nowhere)",
)
@pytest.mark.timeout(120)
def test_an_undecided_computation_does_not_slow_other_users(
    tmp_path: Path,
    people: dict[str, Path],  # noqa: F811
    measure,
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    release = tmp_path / "release"
    release.touch()
    ready, done = threading.Event(), threading.Event()
    with shared_nodes(tmp_path, people) as sched:
        mallory = threading.Thread(
            target=_undecided, args=(sched.port, people["mallory"], ready, done)
        )
        mallory.start()
        try:
            assert ready.wait(30), "mallory's computation is ready"
            with SharedJobCluster(
                held, scheduler_host=sched.address, secret_file=str(people["alice"])
            ) as cluster:
                # Short jobs first: the scheduler learns they are, and sends ahead.
                quick = [
                    cluster.submit(-n, str(marks), str(release)) for n in range(1, 41)
                ]
                assert all(job() for job in quick)
                release.unlink()
                first = [cluster.submit(n, str(marks), str(release)) for n in range(4)]
                wait_for(lambda: len(list(marks.iterdir())) >= 44, "4 jobs running")
                placed = cluster._backend._placed  # type: ignore[union-attr]
                before = len(placed)
                later = [
                    cluster.submit(n, str(marks), str(release))
                    for n in range(4, 4 + AHEAD)
                ]
                with contextlib.suppress(AssertionError):  # (counted below)
                    wait_for(
                        lambda: len(placed) >= before + AHEAD,
                        "jobs sent ahead",
                        timeout=10,
                    )
                sent = len(placed) - before
                release.touch()
                assert all(job() for job in first + later)
        finally:
            done.set()
            mallory.join(30)
    measure(f"{sent} of alice's {AHEAD} later jobs sent ahead while 4 held the CPUs")
    assert sent == AHEAD
