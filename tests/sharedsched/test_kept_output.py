"""What jobs print, and what each kept message costs, count as what is kept for a
client that went away: within ``--kept_memory`` in memory (the rest spilled to disk
with the results' own entries) and within ``--max_kept``; a client that comes back
gets it whole."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster, recover_jobs
from dispynb.job import JobStatus
from dispynb.protocol.messages import JobResults
from schedserver.spill import KeptMessages, SpillStore
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess, start_client
from tests.sharedsched.test_kept import _scheduler, _spill_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1 << 20
#: What each job prints; 8 jobs (what the client sends the scheduler at once).
OUTPUT = 8 * MiB
JOBS = 8

#: A client with a recover_file whose JOBS jobs print OUTPUT characters each once
#: the test says "go" (a file); it is killed before.
LOUD_CLIENT = f"""
import sys, time
from dispynb import SharedJobCluster

def loud(n, marks):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()
    while not os.path.exists(os.path.join(marks, os.pardir, "go")):
        time.sleep(0.02)
    print(str(n) * {OUTPUT})
    return n

address, credential, journal, marks = sys.argv[1:]
cluster = SharedJobCluster(
    loud, scheduler_host=address, secret_file=credential, recover_file=journal,
    max_output_size={2 * OUTPUT},
)
jobs = [cluster.submit(n, marks) for n in range({JOBS})]
time.sleep(300)
"""


@pytest.fixture
def small_memory(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler that keeps at most 1 MiB in memory for clients away."""
    yield from _scheduler(tmp_path, nodes, "--kept_memory", "1M")


def test_output_kept_for_a_killed_client_spills_and_arrives_whole(
    small_memory: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """64 MiB printed while the client is away: the scheduler's spill file holds
    it, not its memory (before: none on disk, none counted, its peak RSS +135 MiB
    against +47 MiB now), and recover_jobs gets every job's output whole."""
    assert small_memory.proc is not None
    pid = small_memory.proc.pid
    marks = tmp_path / "marks"
    marks.mkdir()
    journal = tmp_path / "journal.db"
    proc = start_client(
        LOUD_CLIENT, small_memory.address, str(users["alice"]), str(journal),
        str(marks), cwd=tmp_path, name="loud",
    )  # fmt: skip
    try:
        wait_until(lambda: len(list(marks.iterdir())) == 4)  # one per node CPU
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    small_memory.wait_for_log("client gone; its jobs go on")
    (tmp_path / "go").touch()
    small_memory.wait_for_log("no job of it runs, 0 wait", timeout=60)
    on_disk = sum(size for _path, _mode, size in _spill_files(pid, tmp_path / "spill"))
    assert on_disk >= JOBS * OUTPUT - MiB, on_disk / MiB
    # ...and counted so (before: "9 messages (0.0 MiB, 0.0 MiB of it on disk)").
    counted = re.search(r"(\d+) messages \(([\d.]+) MiB, ([\d.]+) MiB of it on disk",
                        small_memory.log_text())  # fmt: skip
    assert counted is not None
    assert float(counted.group(2)) >= JOBS * OUTPUT / MiB
    assert float(counted.group(2)) - float(counted.group(3)) <= 1.0  # --kept_memory
    jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=60)
    assert sorted(job.result for job in jobs) == list(range(JOBS))
    assert all(job.status == JobStatus.Finished for job in jobs)
    for job in jobs:
        assert job.stdout == str(job.result) * OUTPUT + "\n"


def _printed(key: int, text: str) -> JobResults:
    """A job's end that printed ``text`` and returned nothing."""
    return JobResults(
        comp_id=1, results=[[key, 0, "finished", 0.0, 0.0, text, "", None, 0]]
    )


def test_output_counts_against_the_quota(tmp_path: Path) -> None:
    """In-process: what a job printed counts against --max_kept (past it the job's
    entry says its result was not kept, without its output), and a message of
    output only spills to disk past --kept_memory and is read back whole."""
    store = SpillStore(str(tmp_path / "spill"), memory=0)
    kept = KeptMessages(store, "alice/c", quota=4 * 1024)
    try:
        kept.add(_printed(1, "x" * 3000), [])
        assert kept.on_disk > 3000 and store.in_memory == 0
        kept.add(_printed(2, "y" * 3000), [])  # over the quota
        assert kept.full
        first, second = kept.pop()[0], kept.pop()[0]
        assert isinstance(first, JobResults) and isinstance(second, JobResults)
        assert first.results[0][5] == "x" * 3000
        assert second.results[0][5] == "" and "--max_kept" in second.results[0][7]
    finally:
        kept.clear()
        store.close()


def test_many_small_messages_are_bounded_as_large_ones(tmp_path: Path) -> None:
    """In-process: 4,000 jobs' starts and ends of no payload and nothing printed
    count what they cost: within --kept_memory in memory, the rest on disk, and
    past --max_kept the computation is held (before: they counted nothing, all
    held in memory, never over the quota)."""
    store = SpillStore(str(tmp_path / "spill"), memory=64 * 1024)
    kept = KeptMessages(store, "alice/c", quota=1 << 20)
    try:
        for key in range(4000):
            kept.add(JobResults(comp_id=1, results=[], started=[[key, 0, 0.0, 0]]), [])
            kept.add(_printed(key, ""), [])
        assert 0 < store.in_memory <= 64 * 1024 and kept.on_disk > 0
        assert kept.full
        popped = [kept.pop()[0] for _ in range(len(kept))]
        ends = [
            m.results[0][0] for m in popped if isinstance(m, JobResults) and m.results
        ]
        assert ends == list(range(4000))  # each job's end kept still, in order
    finally:
        kept.clear()
        store.close()
