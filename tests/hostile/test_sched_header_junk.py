"""A user of a shared scheduler sends headers of empty lists.

The scheduler decodes a client's message header up to 16 MiB (its cap): an
empty list is one byte on the wire and some 64 bytes decoded, so three pings
carrying 16 M of them each took 11.6 s of its CPU, holding its loop, and another
user's client could not finish its handshake. A header holding more lists and
maps than a sixteenth of the cap is now refused before it is decoded.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from dispynb.secret import read_secret_file, split_credential
from tests.hostile.test_scheduler import alices_jobs_meanwhile, people, shared_nodes
from tests.hostile.tools import RawSession

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

__all__ = ["people"]  # the fixture

LISTS = 16_000_000
PINGS = 3
#: Seconds alice's four jobs may take meanwhile, CPU seconds the scheduler may
#: spend on the pings (sending them takes a second or two here).
ALICE_WAIT = 5.0
CPU_BOUND = 2.0


@pytest.mark.attack(
    id="sched-header-lists",
    title=f"A scheduler user sends {PINGS} pings whose headers carry "
    f"{LISTS // 1_000_000} M empty lists each (16 MB, under its header cap); "
    "another user runs four jobs meanwhile",
    goal=f"refused undecoded; the other user's jobs done within {ALICE_WAIT:.0f} s, "
    f"the scheduler spends under {CPU_BOUND:.0f} s of CPU on them (was: 11.6 s, "
    "and the other user's client could not finish its handshake)",
)
def test_headers_of_empty_lists_are_refused_undecoded(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    junk = [[] for _ in range(LISTS)]
    with shared_nodes(tmp_path, people) as sched:
        assert sched.proc is not None
        scheduler = psutil.Process(sched.proc.pid)
        user, key = split_credential(read_secret_file(people["mallory"]))
        session = RawSession.open(sched.port, key, name=user)
        try:
            session.sock.settimeout(120)
            before = sum(scheduler.cpu_times()[:2])
            start = time.monotonic()
            for _ in range(PINGS):
                session.send_header({"op": "ping", "junk": junk})
            alices = asyncio.run(alices_jobs_meanwhile(sched.address, people["alice"]))
            took = time.monotonic() - start
            cpu = sum(scheduler.cpu_times()[:2]) - before
        finally:
            session.close()
        refused = sched.log_text().count("lists and maps")
    measure(
        f"alice's results {alices} in {took:.1f} s; scheduler CPU {cpu:.1f} s; "
        f"{refused} log lines of the refusals"
    )
    assert alices == [0, 1, 4, 9]
    assert took < ALICE_WAIT and cpu < CPU_BOUND
    assert refused >= 1
