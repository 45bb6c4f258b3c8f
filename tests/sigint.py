"""Ctrl-C the way users send it: a real SIGINT to this process, from another thread.

A terminal's Ctrl-C and JupyterLab's Stop (``os.killpg`` of the kernel's group) both
deliver a real signal. Linux gives a process-directed signal to the main thread
(unless it blocks it), where it interrupts a blocked lock acquire (EINTR) and
Python's handler raises `KeyboardInterrupt` at once. ``_thread.interrupt_main()``
only sets Python's pending-signal flag: a main thread blocked in C sees it only
when its wait ends by itself, so it does not test what users meet (`flag_when`
tests that case: IDEs, debuggers and embedding hosts interrupt that way).
"""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from tests.jobs import WAIT, wait_until


@dataclass
class Sent:
    """When the SIGINT was sent (``time.monotonic()``), once it was."""

    at: float | None = None


@contextmanager
def sigint_when(predicate: Callable[[], bool], timeout: float = WAIT) -> Iterator[Sent]:
    """Send SIGINT to this process once ``predicate()`` holds (polled from a thread).

    Use it around the wait that must be interrupted, from the main thread. A
    KeyboardInterrupt that arrives only after the block (the wait had returned)
    fails the test instead of stopping pytest.
    """
    assert threading.current_thread() is threading.main_thread()
    with python_handles_sigint(), _sending(predicate, timeout) as sent:
        yield sent


@contextmanager
def python_handles_sigint() -> Iterator[None]:
    """Python's own SIGINT handler for the block, as in a user's process or kernel.

    A shell starts a background job (CI's test run, ``cmd &``) with SIGINT ignored,
    and Python then installs no handler: a SIGINT or ``interrupt_main()`` would be
    lost. Any handler other than Python's default or SIG_IGN fails the test.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # With any other handler a SIGINT would kill pytest or be lost.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, previous
    try:
        yield
    finally:
        if previous == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _sending(predicate: Callable[[], bool], timeout: float) -> Iterator[Sent]:
    sent = Sent()
    failure: list[BaseException] = []

    def body() -> None:
        try:
            wait_until(predicate, timeout)
        except AssertionError as exc:
            failure.append(exc)
            return
        sent.at = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=body, name="test-sigint", daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        try:
            thread.join(timeout + WAIT)
            time.sleep(0.01)  # a signal still pending is handled here, not later
        except KeyboardInterrupt:
            raise AssertionError(
                "the SIGINT arrived after the wait had returned"
            ) from None
    if failure:
        raise failure[0]


def run_in_session(
    program: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c program`` in a session of its own (a signal to its group
    reaches nothing else), as a user's program: SIGINT with Python's handler, as
    from a terminal or a kernel manager, even when pytest runs as a background job
    (SIGINT ignored, inherited). Fails the test unless it exits with 0."""
    with python_handles_sigint():  # exec turns the handler into SIG_DFL
        proc = subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def main_waits_in_function(function: str, module: str) -> Callable[[], bool]:
    """Whether the main thread is inside ``<module>.<function>`` now."""
    main = threading.main_thread().ident

    def check() -> bool:
        frame = sys._current_frames().get(main or 0)
        while frame is not None:
            if (
                frame.f_code.co_name == function
                and frame.f_globals.get("__name__") == module
            ):
                return True
            frame = frame.f_back
        return False

    return check


@contextmanager
def flag_when(predicate: Callable[[], bool]) -> Iterator[None]:
    """Set Python's pending-interrupt flag (no signal) once ``predicate()`` holds."""

    def body() -> None:
        wait_until(predicate)
        _thread.interrupt_main()

    with python_handles_sigint():
        thread = threading.Thread(target=body, name="test-interrupt-flag", daemon=True)
        thread.start()
        try:
            yield
        finally:
            thread.join(WAIT)


#: Modules of the callbacks the garbage collector may run in any frame: a Ctrl-C
#: landing in one is lost ("Exception ignored in ..."), Python's affair.
_GC_CALLBACKS = frozenset({"weakref", "_weakrefset"})


class SigintAtCReturn:
    """A profile function (``sys.setprofile``) sending a real SIGINT to this
    process as the ``point``-th C call returns (where Python runs the handler,
    raising `KeyboardInterrupt` there): a Ctrl-C landing at that point. With
    ``module``, only the calls made by that module's code count."""

    def __init__(self, point: int, module: str | None = None) -> None:
        self.point = point
        self.module = module
        self.returns = 0
        #: Whether the SIGINT was sent (False: fewer C calls than ``point``).
        self.sent = False

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "c_return":
            return
        module = frame.f_globals.get("__name__")
        if module in _GC_CALLBACKS:  # Python ignores an exception there (it warns)
            return
        if self.module is not None and module != self.module:
            return
        self.returns += 1
        if self.returns == self.point:
            sys.setprofile(None)
            self.sent = True
            signal.raise_signal(signal.SIGINT)
