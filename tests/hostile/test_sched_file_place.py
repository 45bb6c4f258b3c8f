"""One user of a scheduler asks for her file to be placed on the nodes, again and
again, without waiting for the answers.

Each ``send_file`` (`FilePlace`) has the scheduler write the whole file to every
node of the computation, from a read-only map of it. Each request mapped the file
anew, and nothing bounded the requests waiting for their nodes: while the nodes
took the first copies, thousands of requests (100 bytes each) held a map each, of
the 65,530 a process may have (``vm.max_map_count``), and a descriptor each (a
map holds one), past which the scheduler can map and open nothing, for any user.
Now a file is mapped once, when it is kept, however often it is sent, and a
computation has 64 requests waiting at most; past that they are refused, saying
so.

The nodes are stopped (SIGSTOP) while she sends: as nodes busy taking a large file,
they take nothing more, without burning this machine's CPUs on copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster
from dispynb.protocol import serialize
from dispynb.protocol.files import digest_of
from dispynb.protocol.messages import (
    ComputationReady,
    ComputationSetup,
    FilePlace,
    FilePlaced,
    FilePut,
)
from tests.hostile.test_scheduler import alices_jobs_meanwhile, people
from tests.sharedsched.harness import SchedulerProcess, raw_scheduler_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

__all__ = ["people"]  # the fixture

MiB = 1 << 20
FILE = MiB // 4
#: Requests she sends, and the maps the scheduler may gain meanwhile.
REQUESTS = 3000
MAPS = 100
#: Seconds each step may take, and without an answer once all are read.
WAIT = 30
QUIET = 3.0


def square(n: int) -> int:
    return n * n


def maps_of(pid: int) -> int:
    """Memory maps the process has."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum(1 for _line in maps)


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """The processes stopped (SIGSTOP) meanwhile."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


async def _place_again_and_again(
    sched: SchedulerProcess, credential: Path, nodes: LocalCluster
) -> tuple[int, list[str]]:
    """Send a file, set a computation up, then (its nodes stopped) ask `REQUESTS`
    times to place the file: the maps the scheduler gained, and the refusals."""
    assert sched.proc is not None
    conn = await raw_scheduler_session(sched.port, credential)
    try:
        data = memoryview(os.urandom(FILE))
        digest = digest_of(data)
        conn.write(FilePut(digest=digest, size=data.nbytes), [data])
        bundle = serialize.dumps({"func": square, "setup": None, "setup_args": ()})
        conn.write(ComputationSetup(comp_id=1, name="placing", workers=4), bundle)
        async with asyncio.timeout(WAIT):
            while not isinstance((await conn.recv())[0], ComputationReady):
                pass
        before = maps_of(sched.proc.pid)
        refusals: list[str] = []
        with stopped(nodes.pids):
            for request in range(REQUESTS):
                conn.write(
                    FilePlace(comp_id=1, request=request, path=f"f{request}",
                              digest=digest)
                )  # fmt: skip
            await conn.flush()
            # Read until no answer came for `QUIET` s (every request read by then).
            last = time.monotonic()
            while time.monotonic() - last < QUIET:
                with contextlib.suppress(TimeoutError):
                    message, _ = await asyncio.wait_for(conn.recv(), QUIET)
                    if isinstance(message, FilePlaced):
                        last = time.monotonic()
                        if message.error:
                            refusals.append(message.error)
            gained = maps_of(sched.proc.pid) - before
        return gained, refusals
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-file-place-flood",
    title=f"A scheduler user asks {REQUESTS:,} times at once to place her file of "
    f"{FILE // 1024} KiB on the nodes (send_file), while they take nothing",
    goal=f"the scheduler gains under {MAPS} memory maps; the requests past 64 "
    "refused, saying why; another user's jobs run after (was: a map and a "
    "descriptor per request, +2,995 maps)",
)
def test_placing_a_file_again_and_again_is_bounded(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with LocalCluster(nodes=2, cpus=2) as nodes:
        # Pulses 10 s apart: the nodes stopped are not declared dead meanwhile.
        args = ("--pulse_interval", "10")
        sched = SchedulerProcess(tmp_path, nodes.node_specs(), nodes.secret, args)
        sched.start()
        try:

            async def attack() -> tuple[int, list[str], list[int] | str]:
                gained, refusals = await _place_again_and_again(
                    sched, people["mallory"], nodes
                )
                alices = await alices_jobs_meanwhile(sched.address, people["alice"])
                return gained, refusals, alices

            started = time.monotonic()
            gained, refusals, alices = asyncio.run(attack())
            took = time.monotonic() - started
        finally:
            sched.stop()
    measure(
        f"scheduler +{gained} memory maps; {len(refusals)} of {REQUESTS:,} requests "
        f"refused ({refusals[0][:100] if refusals else 'none'}...); alice's results "
        f"{alices} ({took:.0f} s in all)"
    )
    assert gained < MAPS
    assert len(refusals) >= REQUESTS - 64
    assert all("send_file" in text for text in refusals)
    assert alices == [0, 1, 4, 9]
