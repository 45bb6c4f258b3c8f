"""A `SharedJobCluster` with a ``recover_file`` says which results it has journaled
(`ResultsJournaled`), and the scheduler keeps only the others for its recovery:
with a real scheduler over real node processes, what it keeps on disk while the
cluster is open, and that a client killed between receiving results and journaling
them still recovers every one through the scheduler."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster, recover_jobs
from dispynb.job import JobStatus
from dispynb.protocol.messages import JobResults, ResultChunk
from schedserver.spill import KeptMessages, SpillStore
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


def test_results_the_client_journaled_are_not_kept_by_the_scheduler(
    on_disk: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """Every result reaches the client and its journal, and the scheduler's spill
    holds none of them while the cluster is open (before: all 40, 2.5 MiB, until
    it closed)."""
    assert on_disk.proc is not None
    pid = on_disk.proc.pid
    cluster = SharedJobCluster(
        bytes_of,
        scheduler_host=on_disk.address,
        secret_file=str(users["alice"]),
        recover_file=str(tmp_path / "journal.db"),
    )
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
    store = SpillStore(str(tmp_path / "spill"), memory=2 * KiB)
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
    assert (len(kept), kept.size, store.in_memory, kept.on_disk) == (
        4,
        4 * KiB,
        2 * KiB,
        2 * KiB,
    )
    assert kept.journaled([[1, 0], [9, 9], [4, 1], "x", [1], ["a", "b"]]) == 0
    assert kept.journaled([[2, 0]]) == 1  # both of the first message's jobs
    assert (len(kept), kept.size, store.in_memory) == (3, 2 * KiB, 0)
    assert kept.journaled([[3, 0], [3, 0]]) == 2  # the chunk (on disk) and its entry
    assert kept._fd is not None  # job 4's payload is still on disk
    assert kept.journaled([[4, 0]]) == 1
    assert (len(kept), kept.size, kept._fd) == (0, 0, None)
    # What was not acknowledged is collected in order, as without acknowledgements.
    kept.add(_results((5, 0)), [page])
    kept.add(_results((6, 0)), [page])
    kept.add(_results((7, 0)), [page])
    assert kept.journaled([[6, 0]]) == 1
    assert [kept.pop()[0].results[0][0] for _ in range(2)] == [5, 7]
    assert (len(kept), kept.size, store.in_memory) == (0, 0, 0)
