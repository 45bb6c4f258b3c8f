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

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Protocol

__all__ = ["SLICE", "HeldInterrupts", "acquire", "wait_event", "wait_for"]

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


class HeldInterrupts:
    """``with HeldInterrupts():`` a Ctrl-C that reaches the main thread meanwhile (a
    SIGINT, or ``_thread.interrupt_main()``) is held and raised as it ends.

    For short steps that do the I/O thread's work on the user's thread (a job's
    message written or its result handled while the loop is idle): an interrupt in
    their middle would leave the client's bookkeeping half done, with a job counted
    as sent or finished that never is. Other threads never get ``KeyboardInterrupt``:
    nothing to hold there.
    """

    __slots__ = ("_held", "_previous")

    def __init__(self) -> None:
        self._previous: Any = None
        self._held: list[FrameType | None] = []  # the frames interrupted

    def __enter__(self) -> HeldInterrupts:
        if not _in_main():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if callable(previous):  # SIG_IGN / SIG_DFL raise nothing in Python
            self._previous = previous
            signal.signal(signal.SIGINT, self._hold)
        return self

    @property
    def pending(self) -> bool:
        """Whether an interrupt is held: a wait in the step should end soon."""
        return bool(self._held)

    def drop(self) -> None:
        """Put the handler back and forget what was held: in a child forked while
        this was in place, whose main thread never ends the step."""
        previous, self._previous, self._held = self._previous, None, []
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self._held.append(frame)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        previous = self._previous
        if previous is None:
            return
        self._previous = None
        signal.signal(signal.SIGINT, previous)
        held, self._held = self._held, []
        if held:
            previous(signal.SIGINT, held[0])  # default_int_handler raises here
