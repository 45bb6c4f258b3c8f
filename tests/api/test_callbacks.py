"""Tests of the dedicated callback thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from dispynb._callbacks import CallbackDispatcher

WAIT = 5.0  # seconds; an upper bound that is only reached when a test fails


def callback_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dispynb-callbacks"]


@pytest.fixture
def dispatcher() -> Iterator[CallbackDispatcher]:
    dispatcher = CallbackDispatcher()
    yield dispatcher
    assert dispatcher.close(WAIT)


def test_dispatcher_callbacks_run_in_order_on_one_other_thread(dispatcher):
    seen: list[tuple[int, str]] = []
    for i in range(200):
        dispatcher.post(lambda i: seen.append((i, threading.current_thread().name)), i)
    assert dispatcher.flush(WAIT)
    assert [i for i, _ in seen] == list(range(200))
    assert {name for _, name in seen} == {"dispynb-callbacks"}


def test_dispatcher_callback_gets_its_arguments(dispatcher):
    seen: list[tuple[str, int, None]] = []
    dispatcher.post(lambda *args: seen.append(args), "Finished", 1, None)
    assert dispatcher.flush(WAIT)
    assert seen == [("Finished", 1, None)]


def test_dispatcher_not_posted_starts_no_thread():
    before = len(callback_threads())
    dispatcher = CallbackDispatcher()
    assert dispatcher.flush(WAIT)
    assert len(callback_threads()) == before
    assert dispatcher.close(WAIT)


def test_dispatcher_callback_raises_logged_and_later_callbacks_run(
    dispatcher, caplog, allow_error_logs
):
    seen: list[int] = []

    def broken_status(job: int) -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="dispynb._callbacks"):
        dispatcher.post(broken_status, 1)
        dispatcher.post(seen.append, 2)
        assert dispatcher.flush(WAIT)
    assert seen == [2]
    [record] = caplog.records
    assert "broken_status" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)


def test_dispatcher_flush_blocked_callback_times_out_then_succeeds(dispatcher):
    gate = threading.Event()
    dispatcher.post(gate.wait, WAIT)
    assert not dispatcher.flush(timeout=0.05)
    gate.set()
    assert dispatcher.flush(WAIT)


def test_dispatcher_post_from_callback_runs_after_current(dispatcher):
    order: list[str] = []
    inner_done = threading.Event()

    def inner() -> None:
        order.append("inner")
        inner_done.set()

    def outer() -> None:
        dispatcher.post(inner)
        order.append("outer")

    dispatcher.post(outer)
    assert inner_done.wait(WAIT)
    assert order == ["outer", "inner"]


def test_dispatcher_flush_from_callback_raises_runtime_error(dispatcher):
    errors: list[Exception] = []

    def flush_inside() -> None:
        try:
            dispatcher.flush(WAIT)
        except RuntimeError as exc:
            errors.append(exc)

    dispatcher.post(flush_inside)
    assert dispatcher.flush(WAIT)
    assert len(errors) == 1
    assert "deadlock" in str(errors[0])


def test_dispatcher_close_runs_pending_callbacks_and_stops_thread():
    dispatcher = CallbackDispatcher()
    gate = threading.Event()
    seen: list[int] = []
    dispatcher.post(gate.wait, WAIT)
    dispatcher.post(seen.append, 1)
    [thread] = callback_threads()
    gate.set()
    assert dispatcher.close(WAIT)
    assert seen == [1]
    assert not thread.is_alive()
    assert thread not in threading.enumerate()


def test_dispatcher_close_twice_is_harmless():
    dispatcher = CallbackDispatcher()
    dispatcher.post(lambda: None)
    assert dispatcher.close(WAIT)
    assert dispatcher.close(WAIT)
    assert dispatcher.flush(WAIT)
    assert callback_threads() == []


def test_dispatcher_post_after_close_raises_runtime_error():
    dispatcher = CallbackDispatcher()
    dispatcher.close(WAIT)

    def late_status(job: int) -> None:
        pass

    with pytest.raises(RuntimeError, match="late_status"):
        dispatcher.post(late_status, 1)


def test_dispatcher_close_from_callback_stops_after_queued_callbacks():
    dispatcher = CallbackDispatcher()
    seen: list[object] = []
    dispatcher.post(lambda: seen.append(dispatcher.close(WAIT)))
    dispatcher.post(seen.append, "queued before close")
    assert dispatcher.close(WAIT)
    assert seen == [False, "queued before close"]
    assert callback_threads() == []


def test_dispatcher_without_a_thread_runs_callbacks_in_flush_and_close(monkeypatch):
    """Where no thread can start (Python 3.12.0 and 3.12.1 at interpreter exit), a
    post still queues (before, it raised, on the I/O thread: the node whose result
    it was got dropped) and `flush` or `close` runs the callbacks, in order, in
    the thread that calls it."""

    def refused(thread: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr("dispynb._interruptible.start_thread", refused)
    dispatcher = CallbackDispatcher()
    here = threading.get_ident()
    seen: list[object] = []

    def first() -> None:
        assert dispatcher.in_dispatcher_thread()
        with pytest.raises(RuntimeError, match="deadlock"):
            dispatcher.flush(WAIT)
        dispatcher.post(seen.append, "posted by a callback")
        seen.append(threading.get_ident() == here)

    dispatcher.post(first)
    dispatcher.post(seen.append, 2)
    assert seen == []
    assert dispatcher.flush(WAIT)
    assert seen == [True, 2, "posted by a callback"]
    dispatcher.post(seen.append, "at close")
    assert dispatcher.close(WAIT)
    assert seen[-1] == "at close"
    assert not dispatcher.in_dispatcher_thread()
