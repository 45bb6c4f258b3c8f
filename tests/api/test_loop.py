"""Tests of the background I/O loop thread and the Coalescer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from dispynb._loop import Coalescer, LoopRunner

WAIT = 5.0  # seconds; an upper bound that is only reached when a test fails


def io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dispynb-io"]


@pytest.fixture
def runner() -> Iterator[LoopRunner]:
    runner = LoopRunner.acquire()
    yield runner
    runner.release()


async def add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def noop() -> None:
    pass


def test_run_sync_coroutine_returns_result(runner):
    assert runner.run_sync(add, 2, 3) == 5


def test_run_sync_coroutine_runs_on_loop_thread(runner):
    async def thread_name() -> str:
        return threading.current_thread().name

    assert runner.run_sync(thread_name) == "dispynb-io"


def test_run_sync_coroutine_raises_exception_propagates(runner):
    async def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        runner.run_sync(fail)


def test_run_sync_slow_coroutine_times_out_and_is_cancelled(runner):
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError, match="forever"):
        runner.run_sync(forever, timeout=0.05)
    assert cancelled.wait(WAIT)


def test_run_sync_from_loop_thread_raises_runtime_error(runner):
    async def nested() -> None:
        runner.run_sync(noop)

    with pytest.raises(RuntimeError, match="deadlock"):
        runner.run_sync(nested)


def test_run_sync_after_release_raises_runtime_error():
    runner = LoopRunner.acquire()
    runner.release()
    with pytest.raises(RuntimeError, match="released"):
        runner.run_sync(noop)


def test_in_loop_thread_outside_and_inside_differs(runner):
    async def inside() -> bool:
        return runner.in_loop_thread()

    assert not runner.in_loop_thread()
    assert runner.run_sync(inside)


def test_call_soon_from_other_thread_runs_on_loop(runner):
    seen: list[str] = []
    done = threading.Event()

    def record(value: str) -> None:
        seen.append(f"{value}@{threading.current_thread().name}")
        done.set()

    runner.call_soon(record, "x")
    assert done.wait(WAIT)
    assert seen == ["x@dispynb-io"]


def test_acquire_twice_shares_one_thread_until_last_release():
    first = LoopRunner.acquire()
    second = LoopRunner.acquire()
    assert first is second
    assert len(io_threads()) == 1
    first.release()
    assert len(io_threads()) == 1
    assert second.run_sync(add, 1, 1) == 2
    second.release()
    assert io_threads() == []
    assert second.loop.is_closed()


def test_acquire_after_full_release_starts_new_loop():
    first = LoopRunner.acquire()
    first.release()
    second = LoopRunner.acquire()
    try:
        assert second is not first
        assert second.run_sync(add, 1, 2) == 3
    finally:
        second.release()
    assert io_threads() == []


def test_release_more_than_acquire_raises_runtime_error():
    runner = LoopRunner.acquire()
    runner.release()
    with pytest.raises(RuntimeError, match="release"):
        runner.release()


def test_release_with_pending_task_cancels_it_and_closes_loop(caplog):
    runner = LoopRunner.acquire()
    cancelled = threading.Event()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    tasks: list[asyncio.Task[None]] = []
    runner.call_soon(lambda: tasks.append(asyncio.ensure_future(forever())))
    assert started.wait(WAIT)
    with caplog.at_level(logging.WARNING):
        runner.release()
    assert cancelled.is_set()
    assert tasks[0].cancelled()
    assert runner.loop.is_closed()
    assert io_threads() == []
    assert caplog.records == []


def test_run_sync_waiting_when_loop_stops_is_cancelled():
    runner = LoopRunner.acquire()
    started = threading.Event()
    outcome: list[BaseException] = []

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    def wait() -> None:
        try:
            runner.run_sync(forever)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert started.wait(WAIT)
    runner.release()
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], concurrent.futures.CancelledError)


def block_loop(runner: LoopRunner) -> threading.Event:
    """Park the loop in a callback until the returned event is set."""
    gate = threading.Event()
    parked = threading.Event()

    def park() -> None:
        parked.set()
        gate.wait(WAIT)

    runner.call_soon(park)
    assert parked.wait(WAIT)
    return gate


def test_coalescer_burst_of_triggers_runs_fn_once(runner):
    calls: list[str] = []
    coalescer = Coalescer(runner, lambda: calls.append(threading.current_thread().name))
    gate = block_loop(runner)

    def burst() -> None:
        for _ in range(1000):
            coalescer.trigger()

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    gate.set()
    runner.run_sync(noop)  # FIFO: the coalesced call ran before this one
    assert calls == ["dispynb-io"]


def test_coalescer_trigger_after_run_runs_fn_again(runner):
    calls: list[int] = []
    coalescer = Coalescer(runner, lambda: calls.append(1))
    coalescer.trigger()
    runner.run_sync(noop)
    # Hold the loop so that the next two triggers form one burst for certain.
    gate = threading.Event()
    runner.call_soon(gate.wait, 10)
    coalescer.trigger()
    coalescer.trigger()
    gate.set()
    runner.run_sync(noop)
    assert calls == [1, 1]


def test_coalescer_trigger_while_fn_runs_schedules_one_more_run(runner):
    calls: list[int] = []

    def fn() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            coalescer.trigger()  # an event that arrives while fn is running

    coalescer = Coalescer(runner, fn)
    coalescer.trigger()
    runner.run_sync(noop)  # fn ran and scheduled its second run before this one
    runner.run_sync(noop)
    assert calls == [0, 1]


def test_coalescer_fn_raises_logged_and_next_trigger_runs(
    runner, caplog, allow_error_logs
):
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("boom")

    coalescer = Coalescer(runner, broken)
    with caplog.at_level(logging.ERROR, logger="dispynb._loop"):
        coalescer.trigger()
        runner.run_sync(noop)
        coalescer.trigger()
        runner.run_sync(noop)
    assert calls == [1, 1]
    assert len(caplog.records) == 2
    assert "broken" in caplog.records[0].getMessage()


def test_enter_only_while_the_loop_waits_for_io_and_holds_its_callbacks(runner):
    """`enter` takes the loop's place only while it is idle; meanwhile no callback
    runs, and they run once the caller leaves."""
    deadline = time.monotonic() + WAIT
    while not runner.enter():  # idle once the acquire's own callbacks have run
        assert time.monotonic() < deadline, "the loop never went idle"
    ran = threading.Event()
    runner.call_soon(ran.set)
    assert not ran.wait(0.2)  # woken, the loop waits for the caller to leave
    runner.leave()
    assert ran.wait(WAIT)

    async def from_the_loop() -> bool:
        return runner.enter()

    assert runner.run_sync(from_the_loop) is False
    busy, release = threading.Event(), threading.Event()
    runner.call_soon(lambda: (busy.set(), release.wait(WAIT)))
    assert busy.wait(WAIT)
    assert not runner.enter()  # a callback runs: the loop is not idle
    release.set()


def test_enter_after_the_last_release_is_refused():
    runner = LoopRunner.acquire()
    runner.release()
    assert runner.enter() is False


def enter_when_idle(runner: LoopRunner) -> None:
    deadline = time.monotonic() + WAIT
    while not runner.enter():  # idle once the acquire's own callbacks have run
        assert time.monotonic() < deadline, "the loop never went idle"


def test_a_thread_that_entered_counts_as_the_loop_thread_until_it_leaves(runner):
    """Waiting for the loop there would deadlock: run_sync refuses, as on the loop."""
    enter_when_idle(runner)
    try:
        assert runner.in_loop_thread()
        with pytest.raises(RuntimeError, match="deadlock"):
            runner.run_sync(noop)
    finally:
        runner.leave()
    assert not runner.in_loop_thread()
    assert runner.run_sync(add, 1, 1) == 2


def test_a_callback_scheduled_by_the_thread_that_entered_runs_once_it_leaves(runner):
    """`loop.call_soon` (not thread-safe) from the entered thread, e.g. a future it
    completes: the loop thread, asleep in its wait for I/O, is woken for it."""
    enter_when_idle(runner)
    ran, timer = threading.Event(), threading.Event()
    try:
        runner.loop.call_soon(ran.set)
        runner.loop.call_later(0.01, timer.set)
    finally:
        runner.leave()
    assert ran.wait(WAIT)
    assert timer.wait(WAIT)


def test_interrupt_ends_another_threads_wait_as_ctrl_c_ends_the_main_ones(runner):
    """`interrupt` cancels the call a thread waits in, which raises
    KeyboardInterrupt there; its next calls (cleanup) run as usual."""
    started = threading.Event()
    cancelled = threading.Event()
    outcome: list[object] = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def waiter() -> None:
        try:
            runner.run_sync(forever)
        except KeyboardInterrupt as exc:
            outcome.append(exc)
            outcome.append(runner.run_sync(add, 1, 2))  # cleanup still runs

    thread = threading.Thread(target=waiter)
    assert not runner.interrupt(threading.get_ident())  # waits in no call
    thread.start()
    assert started.wait(WAIT)
    assert thread.ident is not None and runner.interrupt(thread.ident)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert cancelled.is_set()
    assert isinstance(outcome[0], KeyboardInterrupt) and outcome[1] == 3
    assert not runner.interrupt(thread.ident)
