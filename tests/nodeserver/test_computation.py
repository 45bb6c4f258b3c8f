"""`Computation` on the test's loop, its process and workers stood in by threads.

The computation's scheduling of jobs to workers, cancelling, crash handling and
back-pressure are the product's; the process and workers are `tests.inprocess`'s
stand-ins speaking the real control and worker channels. No subprocess.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path
from typing import Any

import pytest

from dispynb.defaults import MAX_MESSAGE_SIZE
from dispynb.errors import SetupError
from dispynb.jobenv import TERMINATED_AT_REQUEST
from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    CANCELLED,
    CRASHED,
    FINISHED,
    RAISED,
    RETURNED,
    TERMINATED,
)
from nodeserver import workerlife
from nodeserver.budget import CpuBudget
from nodeserver.compstate import JobLimits
from nodeserver.computation import Computation, NodeJob
from nodeserver.filestore import FileStore
from tests.asyncutil import run
from tests.inprocess import WAIT, ThreadLauncher, gate, wait_gate, wait_until


def square(x: int) -> int:
    return x * x


def fail_setup() -> int:
    raise ValueError("no data here")


def fail(x: int) -> int:
    raise RuntimeError(f"bad {x}")


def blocked(name: str) -> str:
    return wait_gate(name)


def interruptible(name: str) -> str:
    try:
        return wait_gate(name)
    except KeyboardInterrupt:
        return "caught"


def bundle(func: Any, **extra: Any) -> list[memoryview]:
    spec = {"func": func, "setup": None, "cleanup": None, "setup_args": (), **extra}
    return [memoryview(b) for b in serialize.dumps(spec)]


def job(key: int, *args: Any, attempt: int = 1) -> NodeJob:
    payload = serialize.dumps((args, {}))
    return NodeJob(key, attempt, [memoryview(b) for b in payload])


class Reports:
    """What the computation reported, by job key."""

    def __init__(self) -> None:
        self.entries: dict[int, list[Any]] = {}
        self.values: dict[int, Any] = {}
        self.order: list[int] = []
        self.starts: list[int] = []
        self.failures: list[str] = []

    def report(self, entry: list[Any], buffers: list[memoryview]) -> None:
        key = entry[0]
        assert key not in self.entries, f"job {key} reported twice"
        self.entries[key] = entry
        self.order.append(key)
        if entry[2] == FINISHED:
            self.values[key] = serialize.loads(buffers)

    def outcome(self, key: int) -> str:
        return str(self.entries[key][2])

    def reason(self, key: int) -> str:
        return str(self.entries[key][7])


def make(
    tmp_path: Path,
    reports: Reports,
    *,
    workers: int = 2,
    budget: CpuBudget | None = None,
    launcher: ThreadLauncher | None = None,
) -> tuple[Computation, ThreadLauncher]:
    launcher = launcher or ThreadLauncher()
    computation = Computation(
        comp_id=1,
        name="test",
        workers=workers,
        path=str(tmp_path / "comp"),
        budget=budget or CpuBudget(workers),
        report=reports.report,
        report_provisional=lambda key, attempt, buffers: None,
        report_file=lambda key, path, buffers: None,
        store=FileStore(str(tmp_path / "store"), 0),
        node_name="node",
        node_address="127.0.0.1",
        max_message_size=MAX_MESSAGE_SIZE,
        remove_path=True,
        launcher=launcher,
    )
    computation.on_failure = reports.failures.append
    computation.on_start = lambda key, attempt, when: reports.starts.append(key)
    return computation, launcher


async def finish(computation: Computation, launcher: ThreadLauncher) -> None:
    for name in list(GATES_OPENED):
        gate(name).set()
    await computation.close(terminate=True)
    launcher.join()


async def started(
    tmp_path: Path, func: Any = blocked
) -> tuple[Reports, Computation, ThreadLauncher]:
    """A computation of ``func`` on one worker, started: its reports, it, its
    launcher."""
    reports = Reports()
    computation, launcher = make(tmp_path, reports, workers=1)
    await computation.start(bundle(func))
    return reports, computation, launcher


async def known_short(computation: Computation, reports: Reports) -> str:
    """Run jobs 1 to 5 of ``computation`` (of `blocked`), their gate open: its
    jobs are short on average, so the next ones go ahead to a busy worker. Their
    gate (open)."""
    quick = new_gate("quick")
    open_gate(quick)
    computation.submit([job(key, quick) for key in range(1, 6)])
    await wait_until(lambda: len(reports.entries) == 5, "quick jobs done")
    return quick


async def serves(computation: Computation, reports: Reports, key: int) -> None:
    """``computation`` runs job ``key`` (of `blocked`, its gate open) to its end:
    it still serves."""
    name = new_gate(f"job-{key}")
    open_gate(name)
    computation.submit([job(key, name)])
    await wait_until(lambda: key in reports.entries, f"job {key} ran")
    assert reports.values[key] == name


GATES_OPENED: list[str] = []


def open_gate(name: str) -> None:
    GATES_OPENED.append(name)
    gate(name).set()


def new_gate(name: str) -> str:
    """A fresh closed gate (``name`` made unique), opened at `finish` at the latest."""
    unique = f"{name}-{len(GATES_OPENED)}-{id(object())}"
    GATES_OPENED.append(unique)
    return unique


def test_jobs_run_on_workers_and_results_come_back(tmp_path):
    async def main() -> None:
        reports = Reports()
        computation, launcher = make(tmp_path, reports)
        assert await computation.start(bundle(square)) == 2
        computation.submit([job(key, key) for key in range(1, 11)])
        computation.submit([job(11, "x")])  # the function raises: reported RAISED
        await wait_until(lambda: len(reports.entries) == 11, "all results")
        assert reports.values == {key: key * key for key in range(1, 11)}
        assert reports.outcome(11) == RAISED
        assert "TypeError" in reports.reason(11)
        assert computation.idle
        assert sorted(reports.starts) == list(range(1, 12))
        await computation.close(terminate=False)
        process = launcher.processes[0]
        assert await process.wait() == 0  # it got Shutdown and exited cleanly
        launcher.join()
        assert not (tmp_path / "comp").exists()  # remove_path

    run(main())


def test_setup_failure_raises_with_the_remote_traceback(tmp_path):
    async def main() -> None:
        computation, launcher = make(tmp_path, Reports())
        with pytest.raises(SetupError, match="no data here") as failure:
            await computation.start(bundle(square, setup=fail_setup))
        assert "fail_setup" in (failure.value.remote_traceback or "")
        await computation.close(terminate=True)
        launcher.join()

    run(main())


def test_cancel_running_job_interrupts_it_then_retires_its_worker(tmp_path):
    async def main() -> None:
        reports = Reports()
        computation, launcher = make(tmp_path, reports, workers=1)
        await computation.start(bundle(interruptible))
        computation.submit([job(1, new_gate("cancel"))])
        await wait_until(lambda: launcher.busy_workers(), "job 1 running")
        (pid,) = launcher.busy_workers()
        computation.cancel(1, 1)
        computation.cancel(1, 1)  # twice: one interrupt, one report
        await wait_until(lambda: 1 in reports.entries, "job 1 settled")
        # It caught KeyboardInterrupt and returned: Finished with its value (dispy).
        assert reports.outcome(1) == FINISHED and reports.values[1] == "caught"
        assert launcher.interrupts == [pid]
        # An interrupted worker may hold broken state: it is replaced.
        await wait_until(lambda: launcher.kills == [pid], "worker retired")
        await serves(computation, reports, 2)
        await finish(computation, launcher)

    run(main())


def test_cancel_uncooperative_running_job_reports_terminated(tmp_path):
    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        computation.submit([job(1, new_gate("cancel")), job(2, new_gate("next"))])
        await wait_until(lambda: launcher.busy_workers(), "job 1 running")
        computation.cancel(1, 1)
        await wait_until(lambda: 1 in reports.entries, "job 1 settled")
        assert reports.outcome(1) == TERMINATED
        # The client's constant: its job() does not call this end a failure.
        assert reports.reason(1) == TERMINATED_AT_REQUEST
        # Job 2 waited in the queue and runs on the replacement worker.
        await wait_until(lambda: launcher.busy_workers(), "job 2 running")
        assert 2 not in reports.entries
        await computation.close(terminate=True)
        # Closed with terminate while it ran: its worker was stopped (SIGTERM),
        # reported once it is sure the signal was not the node's own stop.
        await wait_until(lambda: 2 in reports.entries, "job 2 settled")
        assert reports.outcome(2) == CRASHED
        assert "SIGTERM" in reports.reason(2)
        await finish(computation, launcher)

    run(main())


def test_cancel_queued_job_never_runs(tmp_path):
    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        first, second = new_gate("first"), new_gate("second")
        computation.submit([job(1, first), job(2, second)])
        await wait_until(lambda: launcher.busy_workers(), "job 1 running")
        computation.cancel(2, 1)
        assert reports.outcome(2) == CANCELLED  # at once: it was only queued
        assert reports.reason(2) == "job cancelled at the client's request"
        open_gate(first)
        await wait_until(lambda: 1 in reports.entries, "job 1 done")
        assert reports.values[1] == first
        assert reports.starts == [1]  # job 2 never started
        await finish(computation, launcher)

    run(main())


def test_short_jobs_wait_several_deep_in_a_busy_worker_and_cancel_skips_them(
    tmp_path,
):
    """Short jobs go ahead to a busy worker several at a time (fewer writes and
    wake-ups); a cancelled one among them never starts, the others run in order."""

    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        quick = await known_short(computation, reports)
        reports.starts.clear()
        head = new_gate("head")
        computation.submit([job(10, head)])
        await wait_until(lambda: launcher.busy_workers(), "job 10 running")
        computation.submit([job(key, quick) for key in range(11, 17)])
        (worker,) = computation._workers.values()
        assert [j.key for j in worker.assigned] == [10, *range(11, 17)]  # all ahead
        computation.cancel(13, 1)  # sent ahead: settled now, skipped by the worker
        assert reports.outcome(13) == CANCELLED
        # Unless started: the worker is still on job 10 (it sent nothing yet), so
        # it reads the Skip before it gets to 15: settled now, as 13 was.
        computation.cancel(15, 1, unstarted=True)
        assert reports.outcome(15) == CANCELLED
        open_gate(head)
        await wait_until(lambda: len(reports.entries) == 12, "all settled")
        assert reports.order[5:] == [13, 15, 10, 11, 12, 14, 16]
        assert reports.outcome(15) == CANCELLED
        assert reports.starts == [10, 11, 12, 14, 16]
        assert all(reports.values[key] == quick for key in (11, 12, 14, 16))
        await finish(computation, launcher)

    run(main())


def test_a_large_job_that_would_go_through_the_socket_is_not_sent_ahead(tmp_path):
    """Large arguments that are not in shared memory (a node without memfd, or
    whose pool could not make one) went ahead to a busy worker: most of them then
    sat in the node's write buffer until the running job ended, and so did the
    Skip of a cancel unless started, whose answer waited that long (29 s measured
    with 200 MB behind a 30 s job). Now such a job waits in the queue: cancelled
    at once, and the worker's socket is free for what follows."""

    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        quick = await known_short(computation, reports)
        head = new_gate("head")
        computation.submit([job(10, head)])
        await wait_until(lambda: launcher.busy_workers(), "job 10 running")
        computation.submit([job(11, quick, b"x" * (16 << 20))])
        (worker,) = computation._workers.values()
        assert [j.key for j in worker.assigned] == [10]
        computation.cancel(11, 1, unstarted=True)
        assert reports.outcome(11) == CANCELLED
        open_gate(head)
        await wait_until(lambda: 10 in reports.entries, "job 10 done")
        assert reports.values[10] == head
        await finish(computation, launcher)

    run(main())


def test_a_job_being_skipped_stays_cancelled_when_cancelled_again_as_head(tmp_path):
    """A job sent ahead and cancelled if unstarted (the worker is told to skip it),
    then cancelled outright once the job before it ended (an Executor's interrupt:
    its unstarted cancels, then its terminating close) is reported cancelled, as
    the worker skipped it, not terminated (it never ran)."""

    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        quick = await known_short(computation, reports)
        head = new_gate("head")
        computation.submit([job(10, head)])
        await wait_until(lambda: launcher.busy_workers(), "job 10 running")
        computation.submit([job(11, quick)])
        (worker,) = computation._workers.values()
        assert [j.key for j in worker.assigned] == [10, 11]
        computation.cancel(11, 1, unstarted=True)  # the worker is told to skip it
        on_done = computation._on_done

        def cancel_once_head(*args: Any) -> None:
            on_done(*args)
            if worker.assigned and worker.assigned[0].key == 11:
                computation.cancel(11, 1)  # before the worker's word on it

        computation._on_done = cancel_once_head  # type: ignore[method-assign]
        open_gate(head)
        await wait_until(lambda: len(reports.entries) == 7, "both settled")
        assert reports.outcome(11) == CANCELLED
        assert 11 not in reports.starts
        await finish(computation, launcher)

    run(main())


def test_a_job_to_skip_is_cancelled_not_rerun_when_its_worker_dies(tmp_path):
    """A job sent ahead, then cancelled unless started, whose worker dies before it
    could skip it (the node replaces a worker whose job it interrupted: an
    Executor's Ctrl-C) has not started: it ends cancelled, as the client asked,
    instead of being queued again and run on the next worker."""

    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        quick = await known_short(computation, reports)
        computation.submit([job(10, new_gate("head"))])
        await wait_until(lambda: launcher.busy_workers(), "job 10 running")
        computation.submit([job(11, quick), job(12, quick)])
        (worker,) = computation._workers.values()
        assert [j.key for j in worker.assigned] == [10, 11, 12]
        computation.cancel(11, 1, unstarted=True)  # the worker is told to skip it
        launcher.kill_worker(worker.pid)
        await wait_until(lambda: len(reports.entries) == 8, "all settled")
        assert reports.outcome(10) == CRASHED
        assert reports.outcome(11) == CANCELLED and 11 not in reports.starts
        assert reports.values[12] == quick  # not asked to stop: run again
        await finish(computation, launcher)

    run(main())


def test_jobs_sent_ahead_to_a_worker_whose_job_is_cancelled_move_off_it(tmp_path):
    """The jobs sent ahead to a worker whose running job is cancelled are told to
    skip it (the worker is replaced) and run on the next worker; one cancelled
    once it is the interrupted worker's head has not started: it ends cancelled,
    not terminated, and never runs."""

    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        quick = await known_short(computation, reports)
        reports.starts.clear()
        computation.submit([job(10, new_gate("head"))])
        await wait_until(lambda: launcher.busy_workers(), "job 10 running")
        computation.submit([job(11, new_gate("never")), job(12, quick)])
        (worker,) = computation._workers.values()
        assert [j.key for j in worker.assigned] == [10, 11, 12]
        on_done = computation._on_done

        def cancel_once_head(*args: Any) -> None:
            on_done(*args)
            if worker.assigned and worker.assigned[0].key == 11:
                computation.cancel(11, 1)  # before the worker's word on it

        computation._on_done = cancel_once_head  # type: ignore[method-assign]
        computation.cancel(10, 1)
        await wait_until(lambda: len(reports.entries) == 8, "all settled")
        assert reports.outcome(10) == TERMINATED
        assert reports.outcome(11) == CANCELLED
        assert reports.values[12] == quick
        assert reports.starts == [10, 12]
        (replacement,) = computation._workers.values()
        assert replacement is not worker and launcher.kills == [worker.pid]
        await finish(computation, launcher)

    run(main())


def test_worker_killed_mid_job_reports_crash_and_is_replaced(tmp_path):
    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        computation.submit([job(1, new_gate("crash"))])
        await wait_until(lambda: launcher.busy_workers(), "job 1 running")
        # The worker dies (as by the OOM killer): the computation process reports it.
        launcher.kill_worker(launcher.busy_workers()[0])
        await wait_until(lambda: 1 in reports.entries, "job 1 settled")
        assert reports.outcome(1) == CRASHED
        assert "killed by SIGKILL (9)" in reports.reason(1)
        await serves(computation, reports, 2)
        await finish(computation, launcher)

    run(main())


def test_process_death_crashes_running_and_queued_jobs(tmp_path):
    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        computation.submit([job(1, new_gate("a")), job(2, new_gate("b"))])
        await wait_until(lambda: launcher.busy_workers(), "job 1 running")
        launcher.processes[0].kill()
        await wait_until(lambda: len(reports.entries) == 2, "both settled")
        assert reports.outcome(1) == CRASHED and reports.outcome(2) == CRASHED
        assert "process on the node died" in reports.reason(2)
        assert reports.failures == ["the computation's process on the node died"]
        await finish(computation, launcher)

    run(main())


def test_budget_limits_running_jobs_and_hand_back_returns_the_rest(tmp_path):
    async def main() -> None:
        reports = Reports()
        budget = CpuBudget(1)  # two workers, one CPU for this node
        computation, launcher = make(tmp_path, reports, workers=2, budget=budget)
        await computation.start(bundle(blocked))
        first = new_gate("first")
        computation.submit([job(1, first), job(2, new_gate("b")), job(3, "x")])
        await wait_until(lambda: launcher.busy_workers(), "job 1 running")
        # Wait for both workers to be there: the second one stays idle (no CPU).
        await wait_until(lambda: len(launcher.workers) == 2, "both workers")
        assert len(launcher.busy_workers()) == 1 and reports.starts == [1]
        computation.hand_back()  # the node shuts down: unstarted jobs go back
        assert [reports.outcome(k) for k in (2, 3)] == [RETURNED, RETURNED]
        computation.submit([job(4, "late")])
        assert reports.outcome(4) == CANCELLED  # no new job after hand_back
        open_gate(first)
        await wait_until(lambda: 1 in reports.entries, "job 1 done")
        assert reports.values[1] == first
        await finish(computation, launcher)

    run(main())


def test_held_workers_are_not_read_until_released(tmp_path):
    async def main() -> None:
        reports = Reports()
        computation, launcher = make(tmp_path, reports, workers=1)
        await computation.start(bundle(square))
        await wait_until(lambda: len(launcher.workers) == 1, "worker up")
        computation.hold_workers(True)  # back-pressure from a client not reading
        computation.submit([job(1, 3)])
        worker = next(iter(launcher.workers.values()))[1]
        await wait_until(lambda: worker.jobs_run == 1, "job 1 ran in the worker")
        for _ in range(5):  # loop turns in which an unheld reader would have run
            await asyncio.sleep(0)
        assert reports.entries == {}
        computation.hold_workers(False)
        await wait_until(lambda: 1 in reports.entries, "result read after release")
        assert reports.values[1] == 9
        await finish(computation, launcher)

    run(main())


def test_job_over_its_time_limit_is_stopped_and_says_why(tmp_path):
    async def main() -> None:
        reports, computation, launcher = await started(tmp_path)
        slow = job(1, new_gate("slow"))
        slow.timeout = 0.05
        computation.submit([slow])
        await wait_until(lambda: 1 in reports.entries, "job 1 stopped")
        assert reports.outcome(1) == TERMINATED
        assert "time limit of 0.05 s" in reports.reason(1)
        assert len(launcher.interrupts) == 1
        await finish(computation, launcher)

    run(main())


def test_a_computation_closed_while_it_starts_says_so_quietly(tmp_path, monkeypatch):
    """The client goes away while its computation starts (a notebook's Stop just
    after a %%dispy cell began): the node closes the computation between making its
    process and sending it the computation (here: while the process is put in its
    cgroup). start() then raises SetupError ('closed during its setup'), not a
    ConnectionClosedError from sending on the closed channel, which the node's
    session left unhandled ('Task exception was never retrieved' with a traceback,
    and 'Future exception was never retrieved: expected a 'load' message first, got
    'shutdown'' for the process's answer to the Shutdown: a %dispy local node
    printed both in the notebook's cell). A real computation process."""
    placing, release = threading.Event(), threading.Event()

    def held_placement(root: str, pid: int, max_pids: int) -> str | None:
        placing.set()
        release.wait(WAIT)
        return None

    monkeypatch.setattr(workerlife, "node_pids_root", lambda: str(tmp_path))
    monkeypatch.setattr(workerlife, "place_in_new_cgroup", held_placement)
    unretrieved: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _l, ctx: unretrieved.append(ctx["message"]))
        computation = Computation(
            comp_id=1,
            name="test",
            workers=1,
            path=str(tmp_path / "comp"),
            budget=CpuBudget(1),
            report=Reports().report,
            report_provisional=lambda key, attempt, buffers: None,
            report_file=lambda key, path, buffers: None,
            store=FileStore(str(tmp_path / "store"), 0),
            node_name="node",
            node_address="127.0.0.1",
            max_message_size=MAX_MESSAGE_SIZE,
            remove_path=True,
            limits=JobLimits(max_pids=16),
        )
        start = asyncio.create_task(computation.start(bundle(square)))
        await wait_until(placing.is_set, "the process being placed")
        await computation.close(terminate=True)  # the process got Shutdown, exited
        release.set()
        with pytest.raises(SetupError, match="closed during its setup"):
            await start
        del start
        gc.collect()  # an unretrieved future's exception is reported when freed
        await asyncio.sleep(0)

    run(main(), timeout=30)
    assert unretrieved == []
