"""Stop signals that come while a daemon starts.

``dispynb-node`` and ``dispynb-scheduler`` install their asyncio signal handlers
once their event loop runs, after imports, option parsing and (a node) its zygote,
which take a second or more on a loaded machine. A SIGTERM in that window (systemd
stopping a unit that just started, a launcher or LocalCluster closing at once) took
the default action: the process died of the signal, saying nothing, and SIGINT
printed a ``KeyboardInterrupt`` traceback. `run_held` holds them from the first
line of ``main``: the first stop signal raises `StopSignal` wherever start-up is
(waiting on ``--secret-stdin`` too), which ends the daemon with one line and exit
status 0, as a stop once serving does. Where Python drops that exception (raised in
an at-fork callback, a ``__del__``: "Exception ignored"), start-up raises it again
at its checkpoints (`StartupSignals.check`); the zygote is forked with the signals
blocked (`blocked_while_forking`), so they never land in the at-fork callbacks.
After the last checkpoint (`StartupSignals.hand_over`) they are only recorded: the
event loop starting then would drop or log what a handler raised in its machinery,
so the daemon's ``serve`` acts on the recorded one once its own handlers are in
place (`loop_handles_stop_signals`).

This module imports nothing heavy: it is imported before everything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "StartupSignals",
    "StopSignal",
    "blocked_while_forking",
    "loop_handles_stop_signals",
    "run_held",
    "stop_signals",
]


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a daemon cleanly (a node drains): SIGTERM, SIGINT
    (Ctrl-C) and SIGHUP (the terminal or ``ssh`` session it was started from
    closed; by default it would die at once, saying nothing), unless SIGHUP is
    ignored, as ``nohup`` leaves it: it stays ignored."""
    hangup = signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
    return (signal.SIGTERM, signal.SIGINT, *([signal.SIGHUP] if hangup else []))


class StopSignal(BaseException):
    """A stop signal came while the daemon was starting.

    Raised from the signal handler, as `KeyboardInterrupt` is for SIGINT, so that
    start-up ends wherever it is, blocked reading or not; a `BaseException`, so that
    no ``except Exception`` on the way takes it for an error."""

    def __init__(self, signum: int) -> None:
        self.signum = signal.Signals(signum)
        super().__init__(f"stopped by {self.signum.name} while starting")


class StartupSignals:
    """The stop signals held while a daemon starts (`hold`) and once it served
    (`rearm`), with the dispositions they had before (`release`)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        #: Whether a stop signal that ends start-up is said on stderr (`run_held`).
        self.say_stop = True
        self._pid = os.getpid()
        self._previous: dict[signal.Signals, Any] = {}
        self._raise = True
        self._unraisablehook: Callable[[Any], object] | None = None

    def hold(self) -> None:
        """From now on the first stop signal raises `StopSignal`."""
        self._raise = self.received is None
        for signum in stop_signals():
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)
        if self._unraisablehook is None:
            self._unraisablehook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        _reset_in_children(self)

    def hand_over(self) -> None:
        """After start-up's last `check`, as its event loop starts: stop signals are
        recorded, raising nothing (the loop's machinery would drop or log what a
        handler raised there); `loop_handles_stop_signals` acts on the one recorded."""
        self._raise = False

    def rearm(self) -> None:
        """As the daemon's event loop stops (`loop_handles_stop_signals` gives them
        back before closing the loop would set their defaults): record stop
        signals, raising nothing (the daemon is stopping already), so that one
        more does not kill it while it cleans up."""
        self._raise = False
        for signum in self._previous:
            signal.signal(signum, self._handle)

    def release(self) -> None:
        """Give the signals back the dispositions they had before `hold`."""
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous.clear()
        if self._unraisablehook is not None:
            sys.unraisablehook = self._unraisablehook
            self._unraisablehook = None

    @property
    def holding(self) -> bool:
        """Whether it holds the signals (`hold`, and not `release` yet)."""
        return bool(self._previous)

    def ours(self, signum: signal.Signals) -> bool:
        """Whether ``signum`` is handled here now."""
        return signal.getsignal(signum) == self._handle

    def restore_in_child(self) -> None:
        """In a forked child (the node's zygote): the dispositions from before."""
        for signum, previous in self._previous.items():
            if previous is not None and self.ours(signum):
                signal.signal(signum, previous)

    def check(self) -> None:
        """A start-up checkpoint: raise the `StopSignal` the handler raised where
        Python dropped it (an ``os.register_at_fork`` callback, a ``__del__``, a
        weakref callback: "Exception ignored"), so that it is never lost."""
        if self.received is not None and self._raise:
            raise StopSignal(self.received)

    def _unraisable(self, unraisable: Any) -> None:
        """A `StopSignal` Python dropped is not printed as "Exception ignored":
        `check` raises it again."""
        if not isinstance(unraisable.exc_value, StopSignal):
            assert self._unraisablehook is not None
            self._unraisablehook(unraisable)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            if self._raise:
                raise StopSignal(signum)


#: The `StartupSignals` a forked child gives their dispositions back (one per
#: process: `os.register_at_fork` cannot be undone).
_held: list[StartupSignals] = []


def _reset_in_children(held: StartupSignals) -> None:
    if not _held:
        os.register_at_fork(after_in_child=lambda: _held[-1].restore_in_child())
    _held[:] = [held]


@contextlib.contextmanager
def blocked_while_forking() -> Iterator[None]:
    """Stop signals blocked around an ``os.fork()`` in its body: one that comes
    meanwhile is delivered as the body ends, in parent and child alike, not while
    the at-fork callbacks run (logging's among them), where the `StopSignal` its
    handler raises would be printed as "Exception ignored" and dropped. A child
    does not inherit the signals pending in its parent."""
    with _blocked(stop_signals()):
        yield


@contextlib.contextmanager
def _blocked(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """``signals`` blocked in its body, delivered (if they came) as it ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def loop_handles_stop_signals(
    loop: asyncio.AbstractEventLoop,
    on_signal: Callable[[signal.Signals], object],
    held: StartupSignals | None,
) -> Callable[[], None]:
    """Have ``loop`` call ``on_signal(signum)`` for each stop signal, first for the
    one ``held`` recorded since `StartupSignals.hand_over` (a systemd stop or a
    batch system's SIGTERM as the loop started: never lost). Returns the function
    that gives the signals back to ``held`` (`StartupSignals.rearm`) as the daemon
    stops: closing the loop would set their default actions, and one more signal
    would kill it while it cleans up."""
    signals = stop_signals()
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    if held is not None and held.received is not None:
        on_signal(held.received)

    def give_back() -> None:
        if held is None:
            return
        with _blocked(signals):  # one coming meanwhile is recorded, not fatal
            for signum in signals:
                loop.remove_signal_handler(signum)
            held.rearm()

    return give_back


def run_held(
    prog: str, body: Callable[[StartupSignals], int], *, say_stop: bool = True
) -> int:
    """``body(held)``'s exit status, stop signals held from now on (`StartupSignals`):
    one that comes before ``body`` has its event loop's handlers ends it with status
    0 and, if ``say_stop`` (here and in an outer `run_held`), a line on stderr
    naming ``prog``; on return the signals are as before."""
    outer = _held[-1] if _held and _held[-1].holding else None
    held = outer or StartupSignals()  # ``python -m``'s, held before the imports
    if outer is None:
        held.hold()
        held.say_stop = say_stop
    try:
        return body(held)
    except StopSignal as exc:
        from dispynb.daemon import to_journal  # not before a signal needs it

        held.rearm()
        if say_stop and held.say_stop:
            print(f"{'<5>' if to_journal() else ''}{prog}: {exc}", file=sys.stderr)
        return 0
    finally:
        if outer is None:
            held.release()
