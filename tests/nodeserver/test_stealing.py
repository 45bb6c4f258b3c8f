"""Work stealing in `Computation`: jobs sent ahead to a busy worker whose job turns
out long run on an idle worker, each once and reported started once.

The computation's state machine on the test's loop, its workers threads speaking
the real worker channel (`tests.inprocess`). Where the node must not have read a
worker's answers yet (they wait in its socket, as when the loop is slow to read
them or the client is not reading), the worker's connection is held
(`Connection.hold_reading`, the node's own back-pressure); jobs wait on gates.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from pathlib import Path
from typing import Any

from dispynb.protocol.messages import FINISHED, TERMINATED
from nodeserver.compstate import Worker
from nodeserver.computation import Computation
from nodeserver.stealing import STEAL_AFTER
from tests.asyncutil import run
from tests.inprocess import (
    ThreadLauncher,
    gate,
    send_file,
    send_provisional,
    wait_gate,
    wait_until,
)
from tests.nodeserver.test_computation import (
    Reports,
    bundle,
    finish,
    job,
    make,
    new_gate,
    open_gate,
)

#: Job keys, one per run of a job (`ran_here`): each must appear once.
RUNS: list[int] = []


def ran_here(
    key: int, name: str, entered: str = "", tell: bool = False, ballast: bytes = b""
) -> int:
    """A job body: note a run of job ``key``, with ``tell`` send a provisional
    result and a file, open gate ``entered`` (if any), wait for gate ``name``;
    return the worker (thread) it ran in. ``ballast``: arguments of some size."""
    RUNS.append(key)
    if tell:
        send_provisional(key)
        send_file(f"out-{key}", b"data")
    if entered:
        gate(entered).set()
    wait_gate(name)
    return threading.get_ident()


async def warm(
    computation: Computation, reports: Reports, workers: int = 2, jobs: int = 8
) -> str:
    """Start the computation, wait for its ``workers`` and run ``jobs`` quick jobs
    (keys 1 on); return the open gate quick jobs pass. The mean job time is then
    known to be short (whatever the machine's load), so that several jobs go ahead
    (also tests/nodeserver/test_retired_workers.py)."""
    await computation.start(bundle(ran_here))
    await wait_until(lambda: len(computation._workers) == workers, "the workers")
    quick = new_gate("quick")
    open_gate(quick)
    computation.submit([job(key, key, quick) for key in range(1, jobs + 1)])
    await wait_until(lambda: len(reports.entries) == jobs, "quick jobs done")
    computation._mean = 1e-6
    reports.starts.clear()
    RUNS.clear()
    return quick


async def _long_job_with_short_ones_ahead(
    computation: Computation, reports: Reports, long: str
) -> Worker:
    """After 8 quick jobs, submit job 100 (waits for ``long``) and 40 quick ones at
    once; return the worker running job 100, which holds some of them ahead."""
    quick = await warm(computation, reports)
    computation.submit(
        [job(100, 100, long), *(job(key, key, quick) for key in range(101, 141))]
    )
    (holder,) = [w for w in computation._workers.values() if w.assigned[0].key == 100]
    assert len(holder.assigned) > 1, "no job went ahead behind the long one"
    return holder


def _count_steals(monkeypatch: Any) -> list[tuple[int, ...]]:
    """The looks at the workers (`Computation._steal` calls), each as the numbers
    of jobs the workers held then, smallest first."""
    steals: list[tuple[int, ...]] = []
    original = Computation._steal

    def counted(self: Computation) -> None:
        steals.append(tuple(sorted(len(w.assigned) for w in self._workers.values())))
        original(self)

    monkeypatch.setattr(Computation, "_steal", counted)
    return steals


#: A look at the workers of `_ran_ahead_unread`: one idle, the holder with 4 jobs.
HOLDER_SEEN = (0, 4)


async def _ran_ahead_unread(
    computation: Computation, reports: Reports, long: str, tell: bool = False
) -> tuple[Worker, Worker]:
    """Jobs 100, 102, 103 and 104 go to one worker (the holder: 102-104 ahead),
    101 to the other; neither's answers are read. The holder runs 100, 102 and 103
    and starts 104 (which waits for ``long``; with ``tell``, after it sent a
    provisional result and a file). Then the other's answer is read: it is idle,
    nothing queued, while the node still sees 102-104 waiting ahead in the
    holder. Returns (holder, other)."""
    quick = await warm(computation, reports)
    computation.hold_workers(True)
    entered = new_gate("entered")
    computation.submit(
        [
            *(job(key, key, quick) for key in range(100, 104)),
            job(104, 104, long, entered, tell),
        ]
    )
    (holder,) = [w for w in computation._workers.values() if w.assigned[0].key == 100]
    (other,) = [w for w in computation._workers.values() if w is not holder]
    assert [j.key for j in holder.assigned] == [100, 102, 103, 104]
    assert [j.key for j in other.assigned] == [101]
    await wait_until(gate(entered).is_set, "job 104 started in the holder")
    other.conn.hold_reading(False)
    await wait_until(lambda: 101 in reports.entries, "the other worker idle")
    return holder, other


def _watched(tmp_path: Path) -> tuple[Reports, Computation, ThreadLauncher]:
    """A computation on two workers whose starts are noted before their ends
    (`_starts_before_ends`): its reports, it, its launcher."""
    reports = Reports()
    computation, launcher = make(tmp_path, reports, workers=2)
    _starts_before_ends(computation, reports)
    return reports, computation, launcher


async def _holder_seen(
    computation: Computation, reports: Reports, steals: list[tuple[int, ...]]
) -> tuple[Worker, str]:
    """`_ran_ahead_unread` (job 104 waiting for a new gate), until the node looked
    at the holder: the holder, and job 104's gate."""
    long = new_gate("long")
    holder, _other = await _ran_ahead_unread(computation, reports, long)
    await wait_until(lambda: HOLDER_SEEN in steals, "a look at the holder")
    return holder, long


def _starts_before_ends(computation: Computation, reports: Reports) -> None:
    """Note each start in ``reports.starts``, checking it comes before its job's
    end (`_starts_once` asserts it)."""

    def started(key: int, attempt: int, when: float) -> None:
        reports.starts.append(key if key not in reports.entries else -key)

    computation.on_start = started


def _starts_once(reports: Reports, keys: range) -> None:
    """Each job was reported started once (before its end, if the test watched:
    `_starts_before_ends`), finished, and ran once."""
    assert collections.Counter(reports.starts) == collections.Counter(keys)
    assert all(reports.outcome(key) == FINISHED for key in keys)
    assert collections.Counter(RUNS) == collections.Counter(keys)


def test_jobs_waiting_behind_a_long_job_run_on_the_idle_worker(tmp_path):
    """Short jobs go ahead to a busy worker; when its job turns out long while the
    other worker is idle with nothing queued, they are taken back (the busy worker
    is sure to skip them) and run on the idle one, each once, before the long job
    ends. Before, they waited for it."""

    async def main() -> None:
        reports, computation, launcher = _watched(tmp_path)
        long = new_gate("long")
        holder = await _long_job_with_short_ones_ahead(computation, reports, long)
        quick_keys = range(101, 141)
        await wait_until(
            lambda: all(key in reports.entries for key in quick_keys),
            "the quick jobs, while the long one runs",
        )
        assert 100 not in reports.entries
        open_gate(long)
        await wait_until(lambda: 100 in reports.entries, "the long job")
        assert reports.order[-1] == 100
        # None ran in the long job's worker.
        assert all(reports.values[key] != reports.values[100] for key in quick_keys)
        _starts_once(reports, range(100, 141))
        await wait_until(lambda: not holder.taken_back, "the skipped jobs' word")
        assert computation.idle and not holder.stalled
        await finish(computation, launcher)

    run(main())


def _not_sure_once_told(worker: Worker) -> bool:
    """`_before_its_turn` of a worker whose running job ends just as it is told to
    skip the jobs ahead: sure before, not after."""
    return not worker.stalled


def test_jobs_not_sure_to_be_skipped_move_only_once_skipped(tmp_path, monkeypatch):
    """A busy worker whose running job may end just as it is told to skip the ones
    ahead keeps them until it says: skipped, they run elsewhere; each runs once and
    is reported started once."""
    monkeypatch.setattr("nodeserver.stealing._before_its_turn", _not_sure_once_told)

    async def main() -> None:
        reports, computation, launcher = _watched(tmp_path)
        long = new_gate("long")
        holder = await _long_job_with_short_ones_ahead(computation, reports, long)
        ahead = [j.key for j in list(holder.assigned)[1:]]
        await wait_until(
            lambda: all(j.moving for j in list(holder.assigned)[1:]), "told to skip"
        )
        assert [j.key for j in list(holder.assigned)[1:]] == ahead  # kept there
        open_gate(long)
        await wait_until(lambda: len(reports.entries) == 49, "all jobs")
        _starts_once(reports, range(100, 141))
        assert computation.idle and not holder.taken_back
        await finish(computation, launcher)

    run(main())


def test_jobs_a_worker_ran_before_the_node_read_it_are_reported_started(
    tmp_path, monkeypatch
):
    """The race of the first work stealing (b803dc4, reverted): the node looks at
    a busy worker while its answers wait to be read; the jobs it sees ahead have
    run there (or run now). Taken back then, they were marked moving, which held
    their starts; their ends came as results: finished, never reported Running.
    Now a worker whose answers wait is left alone until they are read; each job
    is reported started once, where it ran."""
    steals = _count_steals(monkeypatch)

    async def main() -> None:
        reports, computation, launcher = _watched(tmp_path)
        holder, long = await _holder_seen(computation, reports, steals)
        computation.hold_workers(False)
        await wait_until(lambda: 103 in reports.entries, "jobs 100-103")
        assert 104 not in reports.entries
        # 104 runs, its start reported before it ends; 102-104 never moved.
        assert collections.Counter(reports.starts) == collections.Counter(
            range(100, 105)
        )
        open_gate(long)
        await wait_until(lambda: 104 in reports.entries, "job 104")
        _starts_once(reports, range(100, 105))
        holder_thread = reports.values[100]
        assert all(reports.values[key] == holder_thread for key in (102, 103, 104))
        assert computation.idle and not holder.taken_back
        await finish(computation, launcher)

    run(main())


def test_jobs_run_as_their_worker_was_told_to_skip_them_report_their_start(
    tmp_path, monkeypatch
):
    """The worker's answers are sent just as the node tells it to skip the jobs
    ahead (its running job ends between the node's two looks): the jobs it ran
    before it read the Skips were marked moving, their starts held; each is
    reported started once, with its end. Before, never."""
    monkeypatch.setattr("nodeserver.stealing._before_its_turn", _not_sure_once_told)
    steals = _count_steals(monkeypatch)

    async def main() -> None:
        reports, computation, launcher = _watched(tmp_path)
        holder, long = await _holder_seen(computation, reports, steals)
        assert all(j.moving for j in list(holder.assigned)[1:])
        computation.hold_workers(False)
        await wait_until(lambda: 103 in reports.entries, "jobs 100-103")
        open_gate(long)
        await wait_until(lambda: 104 in reports.entries, "job 104")
        _starts_once(reports, range(100, 105))
        assert computation.idle and not holder.taken_back
        await finish(computation, launcher)

    run(main())


def test_a_job_whose_start_was_held_is_reported_started_before_what_it_sends(
    tmp_path, monkeypatch
):
    """A job the node told its worker to skip, not sure it would (its start held:
    `_start_clock`), runs after all and sends a provisional result and a file
    before it ends. Its start goes to the client first, once; before, the client
    had its provisional result and file while it was not started (its start came
    with its end). Known to run, it no longer moves (a cancel would stop it)."""
    monkeypatch.setattr("nodeserver.stealing._before_its_turn", _not_sure_once_told)
    steals = _count_steals(monkeypatch)

    async def main() -> None:
        reports, computation, launcher = _watched(tmp_path)
        told: list[tuple[str, int]] = []
        note_start = computation.on_start
        assert note_start is not None

        def started(key: int, attempt: int, when: float) -> None:
            told.append(("start", key))
            note_start(key, attempt, when)

        def provisional(key: int, attempt: int, buffers: list[memoryview]) -> None:
            told.append(("provisional", key))

        def sent_file(
            key: int, path: str, buffers: list[memoryview], request: int
        ) -> str:
            told.append(("file", key))
            return ""

        computation.on_start = started
        computation._report_provisional = provisional
        computation._report_file = sent_file
        long = new_gate("long")
        holder, _other = await _ran_ahead_unread(computation, reports, long, True)
        await wait_until(lambda: HOLDER_SEEN in steals, "a look at the holder")
        assert all(j.moving for j in list(holder.assigned)[1:])
        computation.hold_workers(False)
        await wait_until(lambda: ("file", 104) in told, "job 104's file")
        assert told[-3:] == [("start", 104), ("provisional", 104), ("file", 104)]
        assert holder.assigned[0].key == 104 and not holder.assigned[0].moving
        open_gate(long)
        await wait_until(lambda: 104 in reports.entries, "job 104")
        _starts_once(reports, range(100, 105))
        assert computation.idle and not holder.taken_back
        await finish(computation, launcher)

    run(main())


#: Seconds a test watches the node's looks at a busy worker (`_count_steals`):
#: polled, it would look every STEAL_AFTER.
WATCH = 50 * STEAL_AFTER


def test_a_worker_whose_answers_wait_unread_is_looked_at_again_once_read(
    tmp_path, monkeypatch
):
    """The node is not sure of a busy worker whose answers wait unread (here its
    client does not read): it looks again once it reads them, not every
    STEAL_AFTER for as long as they wait (before: about once per STEAL_AFTER)."""
    steals = _count_steals(monkeypatch)

    async def main() -> None:
        reports, computation, launcher = _watched(tmp_path)
        holder, long = await _holder_seen(computation, reports, steals)
        await asyncio.sleep(WATCH)  # the client still does not read
        assert steals.count(HOLDER_SEEN) == 1, steals
        looks = len(steals)
        computation.hold_workers(False)
        await wait_until(lambda: 103 in reports.entries, "jobs 100-103")
        await wait_until(lambda: len(steals) > looks, "a look once answers are read")
        open_gate(long)
        await wait_until(lambda: 104 in reports.entries, "job 104")
        _starts_once(reports, range(100, 105))
        assert computation.idle and not holder.taken_back
        await finish(computation, launcher)

    run(main())


def test_a_worker_whose_runs_wait_unwritten_is_looked_at_again_once_written(
    tmp_path, monkeypatch
):
    """Jobs with arguments of 60 kB go ahead to a worker whose job is long: their
    Runs wait in the node, more than its socket takes, until it reads them (after
    that job). The node, not sure of that worker, looks again once they are all
    written, not every STEAL_AFTER for as long as the job runs (before: about once
    per STEAL_AFTER). Each job runs once."""
    steals = _count_steals(monkeypatch)

    async def main() -> None:
        reports, computation, launcher = _watched(tmp_path)
        quick = await warm(computation, reports)
        long, entered = new_gate("long"), new_gate("entered")
        computation.submit([job(100, 100, long, entered)])
        await wait_until(gate(entered).is_set, "job 100 running")
        (holder,) = [w for w in computation._workers.values() if w.assigned]
        ballast = bytes(60_000)
        computation.submit(
            [job(key, key, quick, "", False, ballast) for key in range(101, 141)]
        )
        assert len(holder.assigned) > 1, "no job went ahead behind the long one"
        # The other worker ran the rest; idle, nothing queued, it has the node look
        # (a look of the warm-up may come first: the other worker was busy then).
        ahead = len(holder.assigned) - 1

        def looks() -> int:
            return steals.count((0, ahead + 1))

        await wait_until(looks, "a look at the holder")
        assert len(reports.entries) == 8 + 40 - ahead
        assert not holder.conn.all_sent  # its Runs wait for it: not taken back
        await asyncio.sleep(WATCH)
        assert looks() == 1, steals
        before = len(steals)
        open_gate(long)
        await wait_until(lambda: len(steals) > before, "a look once Runs are written")
        await wait_until(lambda: len(reports.entries) == 49, "all jobs")
        _starts_once(reports, range(100, 141))
        assert computation.idle and not holder.taken_back
        await finish(computation, launcher)

    run(main())


def test_a_moving_head_job_that_runs_is_cancelled_as_a_running_one(
    tmp_path, monkeypatch
):
    """Job 104 was told to skip (the node not sure the worker would: moving) but
    runs: it became its worker's head. Cancelled now, it may be running, so it is
    interrupted and ends terminated, its start reported first. Before, it was
    taken for a job not started: reported cancelled before it started while it
    ran on (its worker retired only once it ended)."""
    monkeypatch.setattr("nodeserver.stealing._before_its_turn", _not_sure_once_told)
    steals = _count_steals(monkeypatch)

    async def main() -> None:
        reports, computation, launcher = _watched(tmp_path)
        holder, _long = await _holder_seen(computation, reports, steals)
        computation.hold_workers(False)
        await wait_until(lambda: 103 in reports.entries, "jobs 100-103")
        (head,) = holder.assigned
        assert head.key == 104 and head.moving and head.start_held
        computation.cancel(104, 1)
        await wait_until(lambda: 104 in reports.entries, "job 104 settled")
        assert reports.outcome(104) == TERMINATED, reports.reason(104)
        await wait_until(lambda: holder.pid not in computation._workers, "retired")
        assert not launcher.busy_workers()  # 104 no longer runs
        assert reports.starts.count(104) == 1
        assert RUNS.count(104) == 1
        await finish(computation, launcher)

    run(main())
