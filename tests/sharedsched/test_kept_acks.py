"""A `SharedJobCluster` with a ``recover_file`` says which results it has journaled
(`ResultsJournaled`), and the scheduler keeps only the others for its recovery:
with a real scheduler over real node processes, what it keeps on disk while the
cluster is open, and that a client killed between receiving results and journaling
them still recovers every one through the scheduler."""

from __future__ import annotations

import logging
import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster, recover_jobs
from dispynb.job import JobStatus
from dispynb.protocol.messages import JobResults, ResultChunk
from schedserver.spill import (
    BUFFER_COST,
    ENTRY_COST,
    MESSAGE_COST,
    TRACK_COST,
    KeptMessages,
    SpillStore,
)
from tests.api.test_recovery_acks import NEVER_JOURNALING
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess, start_client
from tests.sharedsched.test_kept import _scheduler, _spill_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

KiB = 1 << 10
JOBS = 40
#: Each job's result: JOBS of them make 2.5 MiB, all on disk (--kept_memory 0).
RESULT = 64 * KiB


def bytes_of(n: int) -> bytes:
    return n.to_bytes(4, "big") * (RESULT // 4)


@pytest.fixture
def on_disk(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler that keeps no result payload in memory: all go to its spill."""
    yield from _scheduler(tmp_path, nodes, "--kept_memory", "0")


def journaling(
    func: Callable[..., object],
    sched: SchedulerProcess,
    credential: Path,
    tmp_path: Path,
) -> SharedJobCluster:
    """A cluster of ``func`` on ``sched`` journaling to ``tmp_path``/journal.db
    (and saying what it journaled)."""
    return SharedJobCluster(
        func,
        scheduler_host=sched.address,
        secret_file=str(credential),
        recover_file=str(tmp_path / "journal.db"),
    )


def test_results_the_client_journaled_are_not_kept_by_the_scheduler(
    on_disk: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """Every result reaches the client and its journal, and the scheduler's spill
    holds none of them while the cluster is open (before: all 40, 2.5 MiB, until
    it closed)."""
    assert on_disk.proc is not None
    pid = on_disk.proc.pid
    cluster = journaling(bytes_of, on_disk, users["alice"], tmp_path)
    with cluster:
        jobs = [cluster.submit(n) for n in range(JOBS)]
        assert [job() for job in jobs] == [bytes_of(n) for n in range(JOBS)]
        cluster.wait(timeout=30)
        # The last acknowledgement follows the last result: the spill file goes
        # once nothing in it is kept.
        wait_until(lambda: _spill_files(pid, tmp_path / "spill") == [], timeout=30)


#: A client that receives its results but never journals them, as in
#: tests/api/test_recovery_acks.py, through the scheduler.
UNJOURNALED_CLIENT = (
    NEVER_JOURNALING
    + """
cluster = dispy.SharedJobCluster(compute, scheduler_host=sys.argv[1],
                                 secret_file=sys.argv[2], recover_file=sys.argv[3])
jobs = [cluster.submit(n, sys.argv[4]) for n in range(4)]
time.sleep(60)  # killed before it gets further
"""
)


def kill_unjournaled_client(
    sched: SchedulerProcess, credential: Path, journal: Path, tmp_path: Path
) -> None:
    """Run `UNJOURNALED_CLIENT` until its 4 jobs ran and it received a result it
    does not journal; kill it then."""
    (tmp_path / "marks").mkdir()
    proc = start_client(
        UNJOURNALED_CLIENT, sched.address, str(credential), str(journal),
        str(tmp_path), cwd=tmp_path, name="unjournaled",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        wait_until(lambda: len(list((tmp_path / "marks").iterdir())) == 4)
        (tmp_path / "go").touch()
        assert proc.stdout.readline().strip() == "received", proc.communicate()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    sched.wait_for_log("client gone; its jobs go on")


def check_recovered(journal: Path, credential: Path) -> None:
    """``recover_jobs`` gets each of the 4 jobs' results once."""
    jobs = recover_jobs(str(journal), secret_file=str(credential), timeout=60)
    assert len(jobs) == 4
    assert all(job.status == JobStatus.Finished for job in jobs)
    assert sorted(job.result for job in jobs) == [0, 1, 4, 9]


def test_a_client_killed_before_journaling_its_results_recovers_them(
    on_disk: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """Results the client received but had not journaled (nor acknowledged) when
    it died stay kept by the scheduler, and recover_jobs returns every one."""
    journal = tmp_path / "journal.db"
    kill_unjournaled_client(on_disk, users["alice"], journal, tmp_path)
    check_recovered(journal, users["alice"])


def _results(*jobs: tuple[int, int]) -> JobResults:
    return JobResults(
        comp_id=1,
        results=[
            [key, attempt, "finished", 0.0, 0.0, "", "", "", 1] for key, attempt in jobs
        ],
    )


def test_a_kept_message_goes_once_all_its_jobs_are_acknowledged(tmp_path: Path) -> None:
    """In-process: a message is dropped once every job it holds is journaled (not
    before), a chunk with its job, its memory given back; the spill file is closed
    once nothing on disk is kept; an unknown job or garbage changes nothing."""
    store = SpillStore(str(tmp_path / "spill"), memory=5 * KiB)
    kept = KeptMessages(store, "alice/c", quota=1 << 30)
    try:
        _acknowledge(kept, store)
    finally:
        kept.clear()
        store.close()


def _acknowledge(kept: KeptMessages, store: SpillStore) -> None:
    kept.tracking = True
    page = memoryview(b"x" * KiB)
    kept.add(_results((1, 0), (2, 0)), [page, page])  # in memory
    kept.add(
        ResultChunk(comp_id=1, key=3, attempt=0, index=0, offset=0, size=1), [page]
    )
    kept.add(_results((3, 0)), [])
    kept.add(_results((4, 0)), [page])  # on disk
    # Each message counts its payload, MESSAGE_COST, BUFFER_COST per buffer, and
    # ENTRY_COST and TRACK_COST per job in it.
    job = ENTRY_COST + TRACK_COST
    first = 2 * KiB + MESSAGE_COST + 2 * BUFFER_COST + 2 * job
    third = MESSAGE_COST + job
    on_disk = kept.on_disk  # the second and fourth, their headers with them
    assert (len(kept), store.in_memory, kept.size) == (
        4,
        first + third,
        first + third + on_disk,
    )
    assert on_disk > 2 * KiB
    assert kept.journaled([[1, 0], [9, 9], [4, 1], "x", [1], ["a", "b"]]) == 0
    assert kept.journaled([[2, 0]]) == 1  # both of the first message's jobs
    assert (len(kept), kept.size, store.in_memory) == (3, third + on_disk, third)
    assert kept.journaled([[3, 0], [3, 0]]) == 2  # the chunk (on disk) and its entry
    assert kept._file is not None  # job 4's payload is still on disk
    assert kept.journaled([[4, 0]]) == 1
    assert (len(kept), kept.size, kept._file) == (0, 0, None)
    # What was not acknowledged is collected in order, as without acknowledgements.
    kept.add(_results((5, 0)), [page])
    kept.add(_results((6, 0)), [page])
    kept.add(_results((7, 0)), [page])
    assert kept.journaled([[6, 0]]) == 1
    assert [kept.pop()[0].results[0][0] for _ in range(2)] == [5, 7]
    assert (len(kept), kept.size, store.in_memory) == (0, 0, 0)


def spill_disk(pid: int, prefix: Path) -> list[int]:
    """Bytes of disk each spill file ``pid`` has open under ``prefix`` takes
    (``st_blocks``: what the file system gave it, not its size)."""
    used = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = f"/proc/{pid}/fd/{fd}"
        try:
            info = os.stat(link)
            # (a directory held open is the scheduler's lock on its spill: 16e314e9)
            if os.readlink(link).startswith(str(prefix)) and stat.S_ISREG(info.st_mode):
                used.append(info.st_blocks * 512)
        except FileNotFoundError:
            continue
    return used


def pinned_or_bytes(n: int, go: str) -> bytes:
    """Job ``n`` >= 0: `bytes_of` it; job -1: send a file of as many bytes (kept
    until the client acknowledges the job: once it ended), then wait for ``go``."""
    import os
    import time

    if n >= 0:
        return bytes_of(n)
    with open("pin.bin", "wb") as handle:
        handle.write(bytes_of(0))
    dispy_send_file("pin.bin")  # type: ignore[name-defined]  # noqa: F821
    while not os.path.exists(go):
        time.sleep(0.02)
    return b""


@pytest.fixture
def on_disk_paced(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """`on_disk`, sending a node no more jobs than it has CPUs: none waits there
    behind a job that runs until the test says."""
    yield from _scheduler(tmp_path, nodes, "--kept_memory", "0", "--jobs_per_cpu", "1")


def test_acknowledged_results_give_their_disk_space_back_while_others_stay_kept(
    on_disk_paced: SchedulerProcess,
    users: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A running job's file stays kept (on disk) until the job ends; the results
    of 40 other jobs, acknowledged as they come, leave no space taken on disk
    (before: the spill file kept all 41 payloads' 2.6 MiB while one was kept)."""
    assert on_disk_paced.proc is not None
    pid, spill = on_disk_paced.proc.pid, tmp_path / "spill"
    go = tmp_path / "go"
    (tmp_path / "got").mkdir()
    monkeypatch.chdir(tmp_path / "got")  # where the client saves the file
    cluster = journaling(pinned_or_bytes, on_disk_paced, users["alice"], tmp_path)
    with cluster:
        pin = cluster.submit(-1, str(go))
        wait_until(lambda: (tmp_path / "got" / "pin.bin").exists())  # kept before
        jobs = [cluster.submit(n, str(go)) for n in range(JOBS)]
        assert [job() for job in jobs] == [bytes_of(n) for n in range(JOBS)]
        # What stays on disk: the file (64 KiB), not the 40 results acknowledged
        # (the last acknowledgement follows the last result).
        wait_until(lambda: sum(spill_disk(pid, spill)) <= 2 * RESULT, timeout=30)
        assert len(spill_disk(pid, spill)) == 1  # kept still: the spill file is open
        go.touch()
        assert pin() == b""
        wait_until(lambda: spill_disk(pid, spill) == [], timeout=30)


def test_freed_blocks_are_only_those_no_kept_payload_shares(tmp_path: Path) -> None:
    """In-process: payloads of any size share the spill file's blocks; a block is
    given back once no kept payload is in it, so that however many small payloads
    come and go, the file takes the blocks of those kept only."""
    store = SpillStore(str(tmp_path / "spill"), memory=0)
    kept = KeptMessages(store, "alice/c", quota=1 << 30)
    kept.tracking = True
    try:
        for key in range(2000):  # 100 bytes each: 40 share a 4-KiB block
            kept.add(_results((key, 0)), [memoryview(b"s" * 100)])
        kept.add(_results((2000, 0)), [memoryview(b"b" * 100_003)])
        for key in range(3000, 3300):
            kept.add(_results((key, 0)), [memoryview(b"s" * 100)])
        (used,) = spill_disk(os.getpid(), tmp_path / "spill")
        assert used >= 2300 * 100 + 100_003
        assert kept.journaled([[key, 0] for key in range(2000)]) == 2000
        assert kept.journaled([[key, 0] for key in range(3000, 3299)]) == 299
        # Left: the large payload (its 25 blocks) and the last small one (one).
        (used,) = spill_disk(os.getpid(), tmp_path / "spill")
        assert 100_003 <= used <= 100_003 + 3 * 4096, used
        assert [len(buffers[0]) for _m, buffers in (kept.pop(), kept.pop())] == [
            100_003,
            100,
        ]
        assert spill_disk(os.getpid(), tmp_path / "spill") == []
    finally:
        kept.clear()
        store.close()


def send_bytes(n: int) -> int:
    """Send `bytes_of` ``n`` as file ``sent-n.bin`` (``dispy_send_file``)."""
    name = f"sent-{n}.bin"
    with open(name, "wb") as handle:
        handle.write(bytes_of(n))
    dispy_send_file(name)  # type: ignore[name-defined]  # noqa: F821
    return n


def test_files_jobs_sent_go_with_their_jobs_acknowledgement(
    on_disk: SchedulerProcess,
    users: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The files 40 jobs sent reach the client, and the scheduler keeps none of
    them once the client acknowledged their jobs (before: all 40, 2.5 MiB on disk,
    until the cluster closed)."""
    assert on_disk.proc is not None
    pid = on_disk.proc.pid
    (tmp_path / "got").mkdir()
    monkeypatch.chdir(tmp_path / "got")  # where the client saves them
    cluster = journaling(send_bytes, on_disk, users["alice"], tmp_path)
    with cluster:
        jobs = [cluster.submit(n) for n in range(JOBS)]
        assert [job() for job in jobs] == list(range(JOBS))
        wait_until(lambda: _spill_files(pid, tmp_path / "spill") == [], timeout=30)
    for n in range(JOBS):
        assert (tmp_path / "got" / f"sent-{n}.bin").read_bytes() == bytes_of(n)


#: A client with a recover_file: one job's 2-MiB result (over the scheduler's 1-MiB
#: --max_kept: not kept for it), journaled and acknowledged; then 8 jobs that mark
#: that they run and wait for a "go" file; it says so, then waits to be killed.
OVER_ONCE_CLIENT = """
import os, sys, time
from dispynb import SharedJobCluster

def job(n, size, marks):
    import os, time
    if size:
        return b"b" * size
    open(os.path.join(marks, str(n)), "w").close()
    while not os.path.exists(os.path.join(marks, os.pardir, "go")):
        time.sleep(0.02)
    return n

address, credential, journal, marks = sys.argv[1:]
cluster = SharedJobCluster(
    job, scheduler_host=address, secret_file=credential, recover_file=journal
)
assert len(cluster.submit(0, 2 << 20, marks)()) == 2 << 20
jobs = [cluster.submit(n, 0, marks) for n in range(1, 9)]
print("submitted", flush=True)
time.sleep(300)
"""


@pytest.fixture
def small_quota(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler that keeps 1 MiB per computation at most, and sends a node no
    more jobs than it has CPUs (those of a client queue at the scheduler)."""
    yield from _scheduler(tmp_path, nodes, "--max_kept", "1M", "--jobs_per_cpu", "1")


def test_a_computation_back_under_its_quota_runs_while_its_client_is_away(
    small_quota: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """A result over --max_kept is not kept, but the client journaled it and said
    so: the computation is back under its quota (logged), and the jobs queued at
    the scheduler when the client is killed run (before: they waited for the
    client: "no job of it runs, 4 wait")."""
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = start_client(
        OVER_ONCE_CLIENT, small_quota.address, str(users["alice"]),
        str(tmp_path / "journal.db"), str(marks), cwd=tmp_path, name="over",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted", proc.communicate()
        wait_until(lambda: len(list(marks.iterdir())) == 4)  # one per node CPU
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    small_quota.wait_for_log("client gone; its jobs go on")
    (tmp_path / "go").touch()
    small_quota.wait_for_log("no job of it runs, ", timeout=60)
    log = small_quota.log_text()
    assert "was not kept for its client" in log
    assert "back under its --max_kept quota" in log
    assert "no job of it runs, 0 wait" in log
    assert len(list(marks.iterdir())) > 4  # jobs queued at the scheduler ran


def test_acknowledgements_bring_a_computation_back_under_its_quota(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process: over its quota a computation is held (`full`) until
    acknowledgements bring what it keeps back under it (logged); the rest of a
    large result whose first chunk was not kept is not kept either, and does not
    hold it again."""
    caplog.set_level(logging.INFO, "schedserver.spill")
    store = SpillStore(str(tmp_path / "spill"), memory=1 << 20)
    # A result of 2 KiB, as counted (its buffer, its job's entry, acknowledged).
    one = 2 * KiB + MESSAGE_COST + BUFFER_COST + ENTRY_COST + TRACK_COST
    kept = KeptMessages(store, "alice/c", quota=2 * one)
    kept.tracking = True
    page = memoryview(b"x" * 2 * KiB)
    try:
        kept.add(_results((1, 0)), [page])
        kept.add(_results((2, 0)), [page])  # the quota
        kept.add(_results((4, 0)), [page])  # over: an error entry kept instead
        kept.add(
            ResultChunk(comp_id=1, key=3, attempt=0, index=0, offset=0, size=2),
            [page],
        )
        # The error (its text, its costs) kept instead:
        assert kept.full and 2 * one < kept.size < 2 * one + 2048
        assert kept.journaled([[4, 0]]) == 1  # its error entry: at the quota still
        assert kept.full and kept.size == 2 * one
        assert kept.journaled([[1, 0]]) == 1
        assert not kept.full and kept.size == one
        assert "alice/c: back under its --max_kept quota" in caplog.text
        chunk = memoryview(b"y" * KiB)  # fits, but its stream lost its start
        kept.add(
            ResultChunk(comp_id=1, key=3, attempt=0, index=1, offset=3, size=2),
            [chunk],
        )
        streamed = [3, 0, "finished", 0.0, 0.0, "", "", "", 1, True]
        kept.add(JobResults(comp_id=1, results=[streamed]), [])
        assert not kept.full and one < kept.size < one + 2048
        assert kept.journaled([[2, 0]]) == 1
        message, _buffers = kept.pop()
        assert message.results[0][0] == 3 and "--max_kept" in message.results[0][7]
    finally:
        kept.clear()
        store.close()


def test_acknowledgements_racing_with_a_replay_drop_each_message_once(
    tmp_path: Path,
) -> None:
    """In-process: acknowledgements that come while what was kept is replayed to a
    recovering client (`pop`, messages kept meanwhile as they come) drop only what
    is not sent yet; each message leaves once, in order, and nothing is left
    counted (memory, disk) once the replay is done."""
    store = SpillStore(str(tmp_path / "spill"), memory=3 * KiB)
    kept = KeptMessages(store, "alice/c", quota=1 << 30)
    kept.tracking = True
    page = memoryview(b"x" * KiB)
    try:
        for key in (1, 2, 3):  # the third on disk
            kept.add(_results((key, 0)), [page])
        assert kept.pop()[0].results[0][0] == 1
        assert kept.journaled([[1, 0], [2, 0], [1, 0]]) == 1  # 1 went already
        kept.add(_results((4, 0)), [page])  # a job that ends during the replay
        assert kept.journaled([[4, 0]]) == 1
        kept.add(_results((5, 0)), [page])
        left = [kept.pop()[0].results[0][0] for _ in range(len(kept))]
        assert left == [3, 5]
        assert kept.journaled([[3, 0], [5, 0]]) == 0  # sent: nothing to drop
        assert (len(kept), kept.size, store.in_memory, kept._file) == (0, 0, 0, None)
    finally:
        kept.clear()
        store.close()
