"""The shared scheduler attacked by one of its own users.

``dispynb-scheduler`` is the one service that several users share: each holds a
valid credential, so each is the others' attacker. "mallory" (a user of the
scheduler, with her own credential) attacks from her own raw client what is the
scheduler's own (its pre-authentication path is the node's `Listener`, attacked in
test_preauth.py), against a real ``dispynb-scheduler`` process over real
``dispynb-node`` processes on loopback; "alice" is the victim.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.errors import DispynbError
from dispynb.job import JobStatus
from dispynb.protocol import serialize
from dispynb.protocol.files import digest_of
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    Error,
    FilePlace,
    FilePut,
    JobCancel,
    JobResults,
    Recover,
    Recovered,
)
from dispynb.transport.connection import Connection
from dispynb.transport.inbox import INBOX_HIGH
from schedserver.toclient import SEND_HIGH
from tests.hostile.tools import wait_for
from tests.sharedsched.harness import (
    SchedulerProcess,
    add_user,
    raw_reply,
    raw_scheduler_session,
    set_up_raw,
    submit_raw,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20


@pytest.fixture
def people(tmp_path: Path) -> dict[str, Path]:
    """Credentials of alice (the victim) and mallory (the attacker)."""
    return {name: add_user(tmp_path, name) for name in ("alice", "mallory")}


@contextlib.contextmanager
def shared_nodes(
    tmp_path: Path, people: dict[str, Path], *args: str, nofile: int = 0
) -> Iterator[SchedulerProcess]:
    """Two real nodes (2 CPUs each) owned by a real scheduler process (that may
    open ``nofile`` descriptors, if given)."""
    with LocalCluster(nodes=2, cpus=2) as nodes:
        sched = SchedulerProcess(tmp_path, nodes.node_specs(), nodes.secret, args)
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        if nofile:  # (the scheduler inherits it)
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, limits[1]))
        try:
            sched.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        try:
            yield sched
        finally:
            sched.stop()


def held_square(n: int, go: str) -> int:
    """``n * n`` once ``go`` exists (it slept 1.5 s: on a loaded machine the
    attacks below came after the jobs ended, and showed nothing of them)."""
    import os
    import time

    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n


@pytest.mark.attack(
    id="sched-other-users-work",
    title="A scheduler user names another user's computation, job, file and "
    "recovery id",
    goal="every message refused or answered 'not found'; the victim's jobs end "
    "Finished with their results",
)
def test_a_user_cannot_reach_another_users_computation(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    """Mallory learns (or guesses) alice's computation id, job key and recovery id
    and sends, with her own credential: cancel, close, send_file and recover. Ids
    are per session and recovery per user, so none reaches alice's computation."""
    journal = tmp_path / "alice.journal"
    go = tmp_path / "go"
    with (
        shared_nodes(tmp_path, people) as sched,
        SharedJobCluster(
            held_square,
            scheduler_host=sched.address,
            secret_file=str(people["alice"]),
            recover_file=str(journal),
        ) as cluster,
    ):
        jobs = [cluster.submit(n, str(go)) for n in range(4)]  # until the attacks
        config = cluster._backend.driver.config  # type: ignore[union-attr]
        comp_id, recovery_id = config.comp_id, config.recovery_id
        assert recovery_id, "alice's cluster has a recovery id"
        wait_for(lambda: any(job.status == JobStatus.Running for job in jobs), "a job")
        key = jobs[0]._key or 0
        answers = []
        for attack in (
            JobCancel(comp_id=comp_id, key=key, attempt=1),
            ComputationClose(comp_id=comp_id, terminate=True, cancel_waiting=True),
            FilePlace(comp_id=comp_id, request=1, digest="0" * 64, path="../x"),
        ):
            refusal = raw_reply(
                sched.port, people["mallory"], attack, until=Error, never=(JobResults,)
            )
            answers.append("own computations" in refusal.message)
        recovered = raw_reply(
            sched.port,
            people["mallory"],
            Recover(comp_id=comp_id, recovery_id=recovery_id),
            until=Recovered,
            never=(JobResults,),
        )
        answers.append(not recovered.found)
        go.touch()
        results = [job() for job in jobs]
        statuses = {job.status for job in jobs}
    refused = sum(answers)
    measure(
        f"{refused}/4 of mallory's messages refused or not found; alice's results "
        f"{results}, {len(statuses)} status ({', '.join(s.name for s in statuses)})"
    )
    assert refused == 4
    assert results == [0, 1, 4, 9] and statuses == {JobStatus.Finished}


# -- a client that never reads its results ---------------------------------------------

JOBS = 40
RESULT = 16 * MiB
#: Seconds mallory does not read while the scheduler's memory is watched.
WATCH = 8.0
#: What the scheduler may hold for a client that does not read: what waits for
#: its socket (`SEND_HIGH`) and the message that crossed it (a node's results of
#: its 2 workers), the backlog's share of --kept_memory (32 MiB; the rest is on
#: disk), per node connection what is read ahead (`INBOX_HIGH`) and the message
#: being read, and allocator slack.
BOUND = SEND_HIGH + 2 * RESULT + 32 * MiB + 2 * (INBOX_HIGH + 2 * RESULT) + 64 * MiB


def square(n: int) -> int:
    return n * n


def sixteen_mib(i: int) -> bytes:
    return bytes([i]) * (16 << 20)


def _alices_jobs(address: str, credential: Path) -> list[int]:
    with SharedJobCluster(
        square, scheduler_host=address, secret_file=str(credential)
    ) as cluster:
        return [job() for job in [cluster.submit(n) for n in range(4)]]


async def alices_jobs_meanwhile(
    address: str, credential: Path, timeout: float = 60.0
) -> list[int] | str:
    """Run alice's jobs (`_alices_jobs`) off the loop, while an attack goes on in
    it: their results, or what she met instead (the error, shortened)."""
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_alices_jobs, address, credential), timeout
        )
    except Exception as exc:  # what alice meets
        return f"{type(exc).__name__}: {exc}"[:200]


def args_quota_attack(
    tmp_path: Path,
    people: dict[str, Path],
    quota: int,
    attack: Callable[[SchedulerProcess, Path], Awaitable[tuple[int, list[str]]]],
) -> tuple[int, list[str], list[int] | str]:
    """Mallory's ``attack`` (given the scheduler and her credential: the scheduler's
    growth and her refusals) at a scheduler with --max_user_args ``quota`` bytes,
    then alice's jobs (`alices_jobs_meanwhile`): what it returned, and what she got."""
    with shared_nodes(tmp_path, people, "--max_user_args", f"{quota >> 20}M") as sched:

        async def both() -> tuple[int, list[str], list[int] | str]:
            grown, refusals = await attack(sched, people["mallory"])
            alices = await alices_jobs_meanwhile(sched.address, people["alice"])
            return grown, refusals, alices

        return asyncio.run(both())


async def _never_read(
    sched: SchedulerProcess, people: dict[str, Path]
) -> tuple[int, int, int, list[int]]:
    assert sched.proc is not None
    pid = sched.proc.pid
    conn = await raw_scheduler_session(
        sched.port, people["mallory"], max_message_size=1 << 30
    )
    try:
        await set_up_raw(conn, sixteen_mib, name="hoard")
        before = psutil.Process(pid).memory_info().rss
        submit_raw(conn, [(i,) for i in range(JOBS)])
        # Never read (the connection reads 16 MiB ahead, then stops): watch the
        # scheduler's memory, while alice runs jobs.
        peak = before
        alice = asyncio.create_task(
            asyncio.to_thread(_alices_jobs, sched.address, people["alice"])
        )
        deadline = time.monotonic() + WATCH
        while time.monotonic() < deadline or not alice.done():
            peak = max(peak, psutil.Process(pid).memory_info().rss)
            await asyncio.sleep(0.05)
            assert time.monotonic() < deadline + 30, "alice's jobs did not end"
        alices = await alice
        got: set[int] = set()
        async with asyncio.timeout(90):
            while len(got) < JOBS:
                message, _buffers = await conn.recv()
                if isinstance(message, JobResults):
                    got.update(int(entry[0]) for entry in message.results)
        return before, peak, len(got), alices
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-never-reading-client",
    title=f"{JOBS} jobs returning {RESULT // MiB} MiB each, submitted through the "
    "scheduler by a client that never reads",
    goal=f"scheduler RSS growth under {BOUND // MiB} MiB (was +600 MiB); all results "
    "delivered once "
    "it reads; one log line per episode; the victim's jobs run meanwhile",
)
def test_a_client_that_never_reads_cannot_grow_the_scheduler(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(tmp_path, people) as sched:
        before, peak, delivered, alices = asyncio.run(_never_read(sched, people))
        lines = sched.log_text().count("does not read")
    grown = peak - before
    measure(
        f"scheduler RSS {before / MiB:.0f} -> peak {peak / MiB:.0f} MiB "
        f"(+{grown / MiB:.0f} MiB) while mallory did not read; {delivered}/{JOBS} "
        f"results delivered after; {lines} log lines; alice's results meanwhile "
        f"{alices}"
    )
    assert grown < BOUND
    assert delivered == JOBS
    assert 1 <= lines <= 2
    assert alices == [0, 1, 4, 9]


# -- files kept for a session ----------------------------------------------------------

#: Descriptors the scheduler may open (a common default), and the distinct files
#: mallory sends.
NOFILE = 1024
FILES = NOFILE - 10


async def _send_files(conn: Connection, count: int) -> list[str]:
    """Send ``count`` distinct small files (no computation lists them); return the
    scheduler's refusals."""
    refusals: list[str] = []
    try:
        for i in range(count):
            data = memoryview(f"file {i}\n".encode())
            conn.write(FilePut(digest=digest_of(data), size=data.nbytes), [data])
            if conn.unsent > MiB:
                await conn.flush()
        last = time.monotonic()
        async with asyncio.timeout(30):
            while time.monotonic() - last < 2:  # until no refusal for 2 s
                message, _ = await asyncio.wait_for(conn.recv(), 2)
                if isinstance(message, Error):
                    refusals.append(message.message)
                    last = time.monotonic()
    except TimeoutError:
        pass
    except DispynbError as exc:
        return [*refusals, f"connection ended: {exc}"]
    return refusals


def _descriptors(pid: int) -> str:
    """The descriptors ``pid`` has open, for the record: only root may count them
    (the scheduler is not dumpable, so its ``/proc/PID/fd`` is root's). What the
    test proves does not rest on the number: the victim's jobs run meanwhile."""
    try:
        return f"{psutil.Process(pid).num_fds()} descriptors"
    except psutil.AccessDenied:
        return "? descriptors (uncounted: not root, and the scheduler is not dumpable)"


async def _hoard_files(
    sched: SchedulerProcess, people: dict[str, Path]
) -> tuple[list[str], str, list[int] | str]:
    """Mallory sends `FILES` files; while they are kept, alice runs jobs. Return
    the refusals, the scheduler's descriptors and alice's results (or what she
    met)."""
    assert sched.proc is not None
    conn = await raw_scheduler_session(
        sched.port, people["mallory"], max_message_size=MiB
    )
    try:
        refusals = await _send_files(conn, FILES)
        fds = _descriptors(sched.proc.pid)
        alices = await alices_jobs_meanwhile(sched.address, people["alice"])
        return refusals, fds, alices
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-file-hoard",
    title=f"{FILES} distinct files sent to a scheduler at {NOFILE} descriptors, "
    "listed by no computation, kept while the victim works",
    goal="the files past the user's quota refused with a message naming it, one log "
    "line; the victim's jobs run (was: scheduler out of descriptors)",
)
def test_files_sent_by_one_user_do_not_exhaust_the_scheduler(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(tmp_path, people, nofile=NOFILE) as sched:
        refusals, fds, alices = asyncio.run(_hoard_files(sched, people))
        lines = sched.log_text().count("files kept")
    measure(
        f"{len(refusals)}/{FILES} files refused ({refusals[0][:90] if refusals else ''}"
        f"); scheduler at {fds}; {lines} log lines; alice's results "
        f"{alices} meanwhile"
    )
    assert alices == [0, 1, 4, 9]
    assert refusals and "--max_files" in refusals[0] and lines == 1


# -- what a user's names do to the operator's log ------------------------------------

FORGED = "2026-12-05 00:00:00,000 schedserver.server INFO user 'alice' connected from"


@pytest.mark.attack(
    id="sched-log-injection",
    title="A computation named with a line break and a forged log line, whose setup "
    "fails on every node",
    goal="no forged line in the scheduler's log; the name logged escaped",
)
def test_a_computation_name_cannot_forge_scheduler_log_lines(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    name = f"x\n{FORGED} 6.6.6.6\r\x1b[2J"
    with shared_nodes(tmp_path, people) as sched:
        setup = ComputationSetup(comp_id=1, name=name, workers=1)
        answer = raw_reply(
            sched.port,
            people["mallory"],
            setup,
            [memoryview(b"not a pickle")],
            until=ComputationFailed,
        )
        sched.wait_for_log("setup failed on", 2)
        log = sched.log_text()
    forged = sum(line.startswith(FORGED) for line in log.splitlines())
    escaped = log.count("mallory/x\\n2026")
    measure(
        f"{forged} forged lines, {escaped} lines naming it escaped; mallory told: "
        f"{answer.message[:60]!r}"
    )
    assert forged == 0 and escaped >= 2 and "\x1b" not in log


def test_the_scheduler_refuses_seconds_no_timer_can_use(
    tmp_path: Path, people: dict[str, Path]
) -> None:
    """`nan-seconds` (tests/hostile/test_session.py) against the shared scheduler:
    a kept computation's keep_results of NaN would be its expiry timer, in the
    event loop that serves every user."""
    with shared_nodes(tmp_path, people) as sched:
        setup = ComputationSetup(
            comp_id=1, name="nan", workers=1, recovery_id="r" * 32,
            keep_results=float("nan"),
        )  # fmt: skip
        answer = raw_reply(
            sched.port,
            people["mallory"],
            setup,
            serialize.dumps({"func": abs, "setup": None, "setup_args": ()}),
            until=ComputationFailed,
            never=(ComputationReady,),
        )
    assert "field 'keep_results' is nan" in answer.message, answer.message


# -- computations held at once ---------------------------------------------------------

QUOTA = 4
SETUPS = 10


async def _many_computations(
    sched: SchedulerProcess, people: dict[str, Path]
) -> tuple[int, list[str], int, list[int] | str]:
    """Mallory sets up `SETUPS` computations at once and keeps them; alice runs
    jobs meanwhile. Return how many were ready, the refusals, the worker
    processes on the nodes, and alice's results (or what she met)."""
    conn = await raw_scheduler_session(
        sched.port, people["mallory"], max_message_size=MiB
    )
    try:
        bundle = serialize.dumps({"func": square, "setup": None, "setup_args": ()})
        for comp_id in range(1, SETUPS + 1):
            conn.write(
                ComputationSetup(comp_id=comp_id, name="hold", workers=2), bundle
            )
        ready, refusals = 0, []
        async with asyncio.timeout(60):
            while ready + len(refusals) < SETUPS:
                message, _ = await conn.recv()
                if isinstance(message, ComputationReady):
                    ready += 1
                elif isinstance(message, ComputationFailed):
                    refusals.append(message.message)
        processes = len(psutil.Process().children(recursive=True))
        alices = await alices_jobs_meanwhile(sched.address, people["alice"])
        return ready, refusals, processes, alices
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-many-computations",
    title=f"{SETUPS} computations set up at once by one user of a scheduler with "
    f"--max_computations {QUOTA} (each holds a connection and workers on every node)",
    goal=f"{QUOTA} set up, the others refused naming the option, one log line; the "
    "victim's jobs run",
)
def test_one_user_cannot_set_up_computations_past_its_quota(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(tmp_path, people, "--max_computations", str(QUOTA)) as sched:
        ready, refusals, processes, alices = asyncio.run(
            _many_computations(sched, people)
        )
        lines = sched.log_text().count("--max_computations")
    measure(
        f"{ready} set up, {len(refusals)} refused "
        f"({refusals[0][:70] if refusals else ''}); {processes} processes under the "
        f"test; {lines} log lines; alice's results {alices}"
    )
    assert ready == QUOTA and len(refusals) == SETUPS - QUOTA
    assert "--max_computations" in refusals[0] and lines == 1
    assert alices == [0, 1, 4, 9]
