"""Blocking waits that Ctrl-C (or the notebook's Stop) ends promptly in every case.

A real SIGINT ends a main thread's blocked lock acquire at once (EINTR, then Python's
handler raises `KeyboardInterrupt`). Python sees an interrupt only through its
pending-signal flag, though, when the signal was taken by another thread (one that
did not block it while the main thread did) or when it was raised with
``_thread.interrupt_main()`` (IDEs, debuggers, embedding hosts): a main thread blocked
in C then notices it only when its wait ends by itself, maybe hours later. So the
main thread waits in slices of `SLICE` seconds and the flag is handled within one
slice; other threads (nobody interrupts them) block in one call, without wake-ups.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["SLICE", "acquire", "wait_event", "wait_for"]

#: Seconds a main thread's wait blocks at most before Python checks for signals.
SLICE = 0.25


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...


def _in_main() -> bool:
    # Asked each time: after a fork from another thread, that thread is the main one.
    return threading.get_ident() == threading.main_thread().ident


def _slices(timeout: float | None) -> Callable[[], float]:
    """A function giving the next slice to block (<= 0: the timeout has passed)."""
    if timeout is None:
        return lambda: SLICE
    deadline = time.monotonic() + max(timeout, 0.0)
    return lambda: min(SLICE, deadline - time.monotonic())


def acquire(lock: _Lock, timeout: float | None = None) -> bool:
    """``lock.acquire(True, timeout)`` (``None``: no limit); True if acquired."""
    if not _in_main():
        return (
            lock.acquire() if timeout is None else lock.acquire(True, max(timeout, 0.0))
        )
    step = _slices(timeout)
    while True:
        left = step()
        if left <= 0:
            return lock.acquire(False)
        if lock.acquire(True, left):
            return True


def wait_for(
    condition: threading.Condition,
    predicate: Callable[[], bool],
    timeout: float | None = None,
) -> bool:
    """``condition.wait_for(predicate, timeout)``, with ``condition`` held."""
    if not _in_main():
        return condition.wait_for(predicate, timeout)
    step = _slices(timeout)
    while True:
        left = step()
        if left <= 0:
            return predicate()
        if condition.wait_for(predicate, left):
            return True


def wait_event(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)``: True if the event is set."""
    if not _in_main():
        return event.wait(timeout)
    step = _slices(timeout)
    while True:
        left = step()
        if left <= 0:
            return event.is_set()
        if event.wait(left):
            return True
