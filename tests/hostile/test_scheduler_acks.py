"""A user of the shared scheduler acknowledges results as journaled
(`ResultsJournaled`) that are not hers: another user's computation's (the ids she
can guess: every session numbers its computations from 1), or garbage. The
scheduler drops kept results only for the computation's own client, only those it
names: the victim, killed before journaling its results, still recovers them all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from dispynb import LocalCluster, recover_jobs
from dispynb.job import JobStatus
from dispynb.protocol import serialize
from dispynb.protocol.auth import MAC_SIZE
from dispynb.protocol.framing import PREFIX_SIZE, Frame, encode_frames
from dispynb.protocol.messages import (
    ComputationReady,
    ComputationSetup,
    Error,
    JobResults,
    JobSubmit,
    ResultsJournaled,
    pack_header,
)
from tests.sharedsched.harness import (
    SchedulerProcess,
    add_user,
    raw_scheduler_session,
    refusals_before_round_trip,
)
from tests.sharedsched.test_kept_acks import kill_unjournaled_client

pytestmark = pytest.mark.slow

MiB = 1 << 20

#: What mallory sends: every computation id alice's client may have, naming every
#: job it may have had, then malformed acknowledgements.
ATTACKS: list[ResultsJournaled] = [
    *(
        ResultsJournaled(comp_id=comp_id, jobs=[[key, 0] for key in range(10)])
        for comp_id in range(5)
    ),
    ResultsJournaled(comp_id=1, jobs=[["1", 0], [1], [1, 0, 0]]),
    ResultsJournaled(comp_id=1, jobs=5),  # type: ignore[arg-type]
    ResultsJournaled(comp_id=1, jobs=[[1.0, 0.0], None]),  # type: ignore[list-item]
]


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[SchedulerProcess, dict[str, Path]]]:
    """Two real nodes owned by a real scheduler; alice's and mallory's
    credentials."""
    people = {name: add_user(tmp_path, name) for name in ("alice", "mallory")}
    with (
        LocalCluster(nodes=2, cpus=2) as nodes,
        SchedulerProcess.owning(tmp_path, nodes) as sched,
    ):
        yield sched, people


async def _acknowledge_others(port: int, credential: Path) -> int:
    """Send `ATTACKS` from mallory's raw session; how many were refused."""
    conn = await raw_scheduler_session(port, credential)
    try:
        for message in ATTACKS:
            conn.write(message)
        refused = 0
        async with asyncio.timeout(20):
            while refused < len(ATTACKS):
                message, _ = await conn.recv()
                refused += isinstance(message, Error)
        return refused
    finally:
        conn.close()


@pytest.mark.timeout(120)
@pytest.mark.attack(
    id="scheduler-foreign-acks",
    title="A scheduler user acknowledges another's results, or garbage, as journaled",
    goal="each refused; the victim's kept results stay: it recovers all of them",
)
def test_acknowledging_another_users_results_drops_nothing(
    measure: Callable[[str], None],
    shared: tuple[SchedulerProcess, dict[str, Path]],
    tmp_path: Path,
) -> None:
    sched, people = shared
    journal = tmp_path / "journal.db"
    kill_unjournaled_client(sched, people["alice"], journal, tmp_path)
    refused = asyncio.run(_acknowledge_others(sched.port, people["mallory"]))
    assert sched.proc is not None
    alive = sched.proc.poll() is None
    jobs = recover_jobs(str(journal), secret_file=str(people["alice"]), timeout=60)
    results = sorted(job.result for job in jobs)
    measure(
        f"{refused} of {len(ATTACKS)} refused (unknown computation, malformed); "
        f"scheduler alive: {alive}; alice recovered {results}"
    )
    assert refused == len(ATTACKS) and alive
    assert results == [0, 1, 4, 9]
    assert all(job.status == JobStatus.Finished for job in jobs)


# -- acknowledgements in bulk ----------------------------------------------------------

#: What mallory acknowledges in one message: each of her 4 jobs a million times
#: (a 12-MiB header).
ACKED = 4_000_000
#: The empty arrays of her other message (a header of as many bytes, each of them a
#: list object of 56 bytes once decoded).
EMPTY = 64 * MiB


def square(n: int) -> int:
    return n * n


def _empty_arrays_frame(count: int) -> Frame:
    """A `ResultsJournaled` frame whose jobs are ``count`` empty arrays, packed by
    hand (a list of that many would take the test's own memory)."""
    header = b"".join(
        [
            b"\x83",
            pack_header({"comp_id": 1})[1:],
            msgpack.packb("jobs"),
            b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count,
            msgpack.packb("op"),
            msgpack.packb(ResultsJournaled.op),
        ]
    )
    head, _parts = encode_frames([header], MAC_SIZE)
    return head[:PREFIX_SIZE], 1, head[PREFIX_SIZE:] + header


class _Peak:
    """The scheduler's peak RSS (VmHWM), in MiB."""

    def __init__(self, pid: int) -> None:
        self.status = Path(f"/proc/{pid}/status")

    def __call__(self) -> int:
        for line in self.status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
        raise AssertionError("no VmHWM")


async def _bulk_acknowledgements(
    sched: SchedulerProcess, credential: Path
) -> tuple[int, list[str], int, float]:
    """Mallory sets up a computation whose results the scheduler keeps until she
    acknowledges them and runs 4 jobs; she sends a 64-MiB header of empty arrays,
    then acknowledges her 4 results in one message of `ACKED` entries. Return the
    scheduler's peak RSS growth (MiB) after the first, the refusals, its peak
    RSS growth after the second and the seconds it took to answer after it."""
    assert sched.proc is not None
    peak = _Peak(sched.proc.pid)
    conn = await raw_scheduler_session(sched.port, credential, max_message_size=MiB)
    try:
        bundle = serialize.dumps({"func": square, "setup": None, "setup_args": ()})
        setup = ComputationSetup(
            comp_id=1, name="acks", workers=2, recovery_id="r" * 32,
            keep_sent=True, ack_journaled=True,
        )  # fmt: skip
        conn.write(setup, bundle)
        payload = serialize.dumps(((3,), {}))
        async with asyncio.timeout(90):
            message, _ = await conn.recv()
            while not isinstance(message, ComputationReady):
                message, _ = await conn.recv()
            assert message.acks_journaled
            jobs = [[key, 0, len(payload)] for key in range(4)]
            conn.write(JobSubmit(comp_id=1, jobs=jobs), list(payload) * 4)
            ended = 0
            while ended < 4:
                message, _ = await conn.recv()
                if isinstance(message, JobResults):
                    ended += len(message.results)
            before = peak()
            conn.relay(_empty_arrays_frame(EMPTY))
            refusals = await refusals_before_round_trip(conn)
            empty_grown = peak() - before
            acks = ResultsJournaled(comp_id=1, jobs=[[n % 4, 0] for n in range(ACKED)])
            before, started = peak(), time.monotonic()
            conn.write(acks)
            refusals += await refusals_before_round_trip(conn)
            took = time.monotonic() - started
        return empty_grown, refusals, peak() - before, took
    finally:
        conn.close()


@pytest.mark.timeout(180)
@pytest.mark.attack(
    id="scheduler-bulk-acks",
    title="A scheduler user sends a 64-MiB header of empty arrays, then acknowledges "
    f"her 4 results in one message of {ACKED:,} entries (a 12-MiB header)",
    goal="the first refused before it is decoded, naming the 16-MiB cap (was: "
    "decoded, the scheduler's peak RSS +4.7 GB); the second refused undecoded too "
    "(4 M lists: more than the scheduler decodes; it was refused as naming more "
    "jobs than she has kept), not checked entry by entry; the scheduler serves on",
)
def test_acknowledgements_in_bulk_are_bounded(
    measure: Callable[[str], None],
    shared: tuple[SchedulerProcess, dict[str, Path]],
) -> None:
    sched, people = shared
    empty_grown, refusals, grown, took = asyncio.run(
        _bulk_acknowledgements(sched, people["mallory"])
    )
    assert sched.proc is not None
    alive = sched.proc.poll() is None
    measure(
        f"64-MiB header: peak RSS +{empty_grown} MiB, refused "
        f"({refusals[0][:60] if refusals else 'not refused'}...); "
        f"{ACKED:,} acknowledgements: peak RSS +{grown} MiB, answered "
        f"{took:.1f} s after, refused ({refusals[-1][:50]}...); alive: {alive}"
    )
    assert len(refusals) == 2 and "16777216-byte cap" in refusals[0]
    assert f"up to {ACKED + 2} lists and maps" in refusals[1]
    assert empty_grown < 128  # the frame (64 MiB) read, not decoded
    assert alive
