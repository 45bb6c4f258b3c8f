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

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, ClassVar, Protocol

__all__ = [
    "SLICE",
    "Flag",
    "HeldInterrupts",
    "Sleepers",
    "acquire",
    "at_the_call",
    "set_event",
    "start_thread",
    "try_start_thread",
    "unblock_in_child",
]

#: Seconds a main thread's wait blocks at most before Python checks for signals.
SLICE = 0.25


def at_the_call(interrupted: BaseException) -> None:
    """Ready a Ctrl-C caught in a public method's wait for a bare ``raise``: its
    traceback ends at the method's own line that waited (the one frame of ours
    Python keeps as it leaves the method), not in dispynb's locks below it, nor at
    a ``raise`` line of ours, and shows no exception it interrupted."""
    tb = interrupted.__traceback__
    if tb is not None:
        tb.tb_next = None
    interrupted.__cause__ = None
    interrupted.__suppress_context__ = True


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...


_get_ident = threading.get_ident

#: The main thread's ident; after a fork from another thread that thread is the
#: main one (`_after_fork_in_child`). Kept here: asked at every job submitted.
_main_ident = threading.main_thread().ident


def _in_main() -> bool:
    return _get_ident() == _main_ident


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


class Sleepers:
    """Threads waiting for a state that other threads change, each asleep on a lock
    of its own that `wake_all` releases: ``threading.Condition`` without its flaw.

    A signal handler that raises (Ctrl-C) in a main thread inside
    ``Condition.wait`` or ``Event.wait`` may leave that thread releasing the
    condition's lock while another thread holds it: CPython lets the lock go before
    the wait's ``try`` and takes it back in its ``finally``, both interruptible. The
    other thread's ``notify`` or ``Event.set`` then raises ``RuntimeError('release
    unlocked lock')`` -- on the I/O thread, in the middle of a node's results, which
    cost the cluster that node. Here the only blocking call is the acquire of a lock
    no other thread holds, which a signal interrupts cleanly; a sleeper left behind
    by an interrupted wait is released later, harmlessly.
    """

    __slots__ = ("_lock", "_sleeping")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sleeping: list[threading.Lock] = []

    def wait_for(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until ``ready()`` is true; False if ``timeout`` seconds pass first.

        Whoever makes ``ready()`` true calls `wake_all` afterwards. On the main
        thread the wait is `acquire`'s: Ctrl-C ends it promptly.
        """
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while not ready():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            sleeper = threading.Lock()
            sleeper.acquire()
            with self._lock:
                self._sleeping.append(sleeper)
            try:
                # Asked again once registered: a change made before is seen here,
                # one made after releases the sleeper.
                if ready():
                    return True
                acquire(sleeper, left)
            finally:
                with self._lock, contextlib.suppress(ValueError):  # woken already
                    self._sleeping.remove(sleeper)
        return True

    def wake_all(self) -> None:
        """Wake every thread waiting now, to ask its ``ready()`` again."""
        if not self._sleeping:  # no waiter (one registering asks ready() after)
            return
        with self._lock:
            sleeping, self._sleeping = self._sleeping, []
        for sleeper in sleeping:
            sleeper.release()


class Flag:
    """``threading.Event``'s ``set``, ``clear``, ``is_set`` and ``wait``, on
    `Sleepers`: a main thread may wait on it through any number of Ctrl-C (the
    notebook's Stop) without breaking it for the thread that sets it."""

    __slots__ = ("_set", "_sleepers")

    def __init__(self) -> None:
        self._set = False
        self._sleepers = Sleepers()

    def set(self) -> None:
        """Set the flag and wake every thread waiting for it."""
        self._set = True
        self._sleepers.wake_all()

    def clear(self) -> None:
        """Reset the flag."""
        self._set = False

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is set; False if ``timeout`` seconds pass first."""
        return self._sleepers.wait_for(self.is_set, timeout)


def set_event(event: threading.Event) -> None:
    """``event.set()`` from a library thread, for a user's event (dispy's
    ``job.finish``) that a user's main thread may wait on: if a Ctrl-C there
    released the event's lock meanwhile (see `Sleepers`), the first ``set`` raises
    ``RuntimeError`` part way (the flag set, waiters maybe not woken); the second,
    with the lock free again, wakes them."""
    try:
        event.set()
    except RuntimeError:
        event.set()


#: Signals whose Python handlers `HeldInterrupts` holds: SIGINT (Ctrl-C, Stop) and
#: those users give handlers that raise (timeouts by alarm or timer, SystemExit on
#: SIGTERM, ...). Only those with a Python handler are swapped.
HELD_SIGNALS = tuple(
    getattr(signal, name)
    for name in (
        "SIGINT",
        "SIGALRM",
        "SIGVTALRM",
        "SIGPROF",
        "SIGTERM",
        "SIGHUP",
        "SIGQUIT",
        "SIGUSR1",
        "SIGUSR2",
    )
    if hasattr(signal, name)
)


def start_thread(thread: threading.Thread) -> None:
    """``thread.start()``, the thread blocking `HELD_SIGNALS` for its whole life.

    The kernel gives a signal sent to the process (Ctrl-C, the notebook's Stop:
    SIGINT to the process group) to any thread that does not block it, and a thread
    that unblocks signals (glibc does, in a thread being started and in the thread
    starting it) takes one waiting for a main thread that was woken but has not run
    yet (a loaded machine). Python's C handler then only marks the signal in that
    thread: a main thread asleep in C (the user's ``time.sleep`` in a generator of
    inputs) is not woken, and the `KeyboardInterrupt` comes when its sleep ends. So
    dispynb's threads leave these signals to the main thread; the mask is set in
    the starting thread around ``start()``, so that the new thread has it from its
    first instruction (and the threads it starts inherit it).
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        thread.start()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        thread.start()
    finally:
        # A signal that came meanwhile is the main thread's: delivered here, now.
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def try_start_thread(thread: threading.Thread) -> bool:
    """`start_thread`; False, not ``RuntimeError``, where no thread can start:
    Python 3.12.0 and 3.12.1 start none once the main thread has ended (3.12.2
    does again), where the results of a script's clusters left open still come;
    a process at its limit of threads."""
    try:
        start_thread(thread)
    except RuntimeError:
        return False
    return True


# `signal.getsignal` and `signal.signal` without the conversion of every number and
# handler to an enum around them (CPython's C functions under them, where present):
# `HeldInterrupts` asks for each of HELD_SIGNALS at every job submitted, and the
# conversions cost ten times the calls (some 10 us per job).
_c_signal: Any = getattr(signal, "_signal", signal)
_getsignal: Callable[[int], Any] = _c_signal.getsignal
_setsignal: Callable[[int, Any], Any] = _c_signal.signal


def unblock_in_child() -> None:
    """A ``preexec_fn`` for programs started from dispynb's threads: a child inherits
    its thread's signal mask, and these block `HELD_SIGNALS` (`start_thread`), so
    ``ssh`` would ignore the SIGTERM that stops it, and SIGHUP, SIGINT..., as would
    what it runs. Runs in the child between fork and exec: one system call, no lock
    (the C function, not `signal.pthread_sigmask`'s conversion to enums)."""
    _c_signal.pthread_sigmask(signal.SIG_SETMASK, ())


class HeldInterrupts:
    """``with HeldInterrupts():`` a Ctrl-C that reaches the main thread meanwhile (a
    SIGINT, or ``_thread.interrupt_main()``), or another signal of `HELD_SIGNALS`
    with a Python handler, is held; its handler runs (and raises) as it ends.

    For short steps that do the I/O thread's work on the user's thread (a job's
    message written while the loop is idle): an exception raised in their middle
    by a signal handler would leave the client's bookkeeping half done, with a job
    counted as sent that never is. Python runs signal handlers on the main thread
    only: nothing to hold on others.

    Steps nest: one begun while another holds the signals (a job's message written
    in the loop's place while `JobCluster.submit` holds them) holds nothing of its
    own; the outermost delivers what came as it ends.

    A W2 round trip begins two outermost steps (issue 17), so entering one costs
    what it must (a look at each handler, two ``sigaction`` calls per handler
    swapped) and little more: nothing is allocated for a step that holds nothing.
    """

    __slots__ = ("_held", "_outer", "_previous")

    #: The outermost step holding signals now (on the main thread), if any.
    _active: ClassVar[HeldInterrupts | None] = None

    def __init__(self) -> None:
        self._previous: dict[int, Any] | None = None  # signal -> the handler replaced
        self._held: list[tuple[int, FrameType | None]] | None = None  # arrival order
        self._outer: HeldInterrupts | None = None  # the step this one is nested in

    def __enter__(self) -> HeldInterrupts:
        if _get_ident() != _main_ident:
            return self
        outer = HeldInterrupts._active
        if outer is not None:  # held already: the outer step delivers them
            self._outer = outer
            return self
        getsignal, setsignal, previous = _getsignal, _setsignal, None
        try:
            for signum in HELD_SIGNALS:
                handler = getsignal(signum)
                if callable(handler):  # SIG_IGN / SIG_DFL raise nothing in Python
                    setsignal(signum, self._hold)
                    if previous is None:
                        previous = self._previous = {}
                    previous[signum] = handler
        except BaseException:
            # A signal pending ran its own handler, which raised (signal.signal runs
            # them first): nothing is held yet, the handlers swapped go back.
            self.drop()
            raise
        HeldInterrupts._active = self
        return self

    @property
    def pending(self) -> bool:
        """Whether a signal is held: a wait in the step should end soon."""
        return bool((self._outer or self)._held)

    def drop(self) -> None:
        """Put the handlers back and forget what was held (the outermost step's, if
        nested): in a child forked while this was in place, whose main thread
        never ends the step."""
        step = self._outer or self
        if HeldInterrupts._active is step:
            HeldInterrupts._active = None
        previous, step._previous, step._held = step._previous, None, None
        if previous:
            for signum, handler in previous.items():
                _setsignal(signum, handler)

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if self._held is None:
            self._held = []
        self._held.append((signum, frame))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._outer is not None:  # nested: the outer step delivers them
            self._outer = None
            return
        if HeldInterrupts._active is self:
            HeldInterrupts._active = None
        previous = self._previous
        if not previous:
            return
        self._previous = None
        for signum, handler in previous.items():
            _setsignal(signum, handler)
        held, self._held = self._held, None
        if held:
            for signum, frame in held:  # the first that raises ends it, as it would
                previous[signum](signum, frame)  # default_int_handler raises here


def _after_fork_in_child() -> None:
    """In a child, the forking thread is the main one (as `threading` says); if
    another thread forked while the main thread held signals, the child's main
    thread (the forking one) never ends that step: dropped."""
    global _main_ident
    _main_ident = _get_ident()
    active = HeldInterrupts._active
    if active is not None:
        active.drop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
