"""Probing several node specs at once, one thread each, and ending the probes at
once when ``%dispy nodes a b`` is interrupted.

A probe makes a cluster (connecting to its node and authenticating) in a thread
of its own; the interrupt (the notebook's Stop: SIGINT) reaches the main thread
only. `ParallelProbes` then interrupts each probe's wait in dispynb's I/O loop
(`dispynb._loop.LoopRunner.interrupt`), as the main thread's own wait would be:
its connection closes and its thread ends, instead of holding the sockets until
the connection's timeouts (up to 15 s) and setting a computation up on a node
that answers late.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from dispynb import _interruptible
from dispynb._interruptible import start_thread
from dispynb._loop import LoopRunner

__all__ = ["STOP_WAIT", "ParallelProbes", "ProbesInterrupted"]

#: Seconds an interrupted `ParallelProbes` waits for its probes to end.
STOP_WAIT = 5.0
#: Seconds between two attempts to interrupt a probe not yet waiting in the loop.
_RETRY = 0.02

#: ``probe(spec, guard)``: probe one spec; the cluster it makes is made inside
#: ``with guard():`` (only there may the probe be interrupted).
Probe = Callable[[str, Callable[[], contextlib.AbstractContextManager[None]]], Any]


class ProbesInterrupted(KeyboardInterrupt):
    """The probes were interrupted, and ended; the message names their specs."""


class ParallelProbes:
    """Runs ``probe`` for each spec in a thread of its own; `run` returns each
    one's outcome, or ends them all when interrupted."""

    def __init__(self, probe: Probe, specs: list[str]) -> None:
        self._probe = probe
        self._specs = specs
        self._lock = threading.Lock()
        self._making: set[int] = set()  # threads making a probe's cluster now
        self._stopping = False
        self._outcomes: dict[str, tuple[Any, BaseException | None]] = {}

    def run(self) -> list[tuple[str, Any, BaseException | None]]:
        """``(spec, result, error)`` for each spec, in order, once every probe has
        ended. Interrupted, it interrupts the probes, waits (at most `STOP_WAIT`
        seconds) for them to end, and raises `ProbesInterrupted`."""
        threads = [
            threading.Thread(
                target=self._one, args=(spec,), name="dispynb-probe", daemon=True
            )
            for spec in self._specs
        ]
        try:
            for thread in threads:
                start_thread(thread)
            for thread in threads:
                while thread.is_alive():  # in slices: Ctrl-C ends it promptly
                    thread.join(_interruptible.SLICE)
        except KeyboardInterrupt:
            self._stop(threads)
            raise ProbesInterrupted(
                f"stopped probing {', '.join(self._specs)}"
            ) from None
        return [(spec, *self._outcomes[spec]) for spec in self._specs]

    def _one(self, spec: str) -> None:
        try:
            result, error = self._probe(spec, self._guard), None
        except BaseException as exc:  # the caller sees it in the outcome
            result, error = None, exc
        with self._lock:
            self._outcomes[spec] = (result, error)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Where a probe may be interrupted: while it makes its cluster."""
        ident = threading.get_ident()
        with self._lock:
            if self._stopping:
                raise KeyboardInterrupt("stopped before it began")
            self._making.add(ident)
        try:
            yield
        finally:
            with self._lock:
                self._making.discard(ident)

    def _stop(self, threads: list[threading.Thread]) -> None:
        """Interrupt each probe once it waits in the I/O loop (one that does not
        wait yet is tried again), then wait for their threads to end."""
        runner = LoopRunner.acquire()
        try:
            done: set[int] = set()
            deadline = time.monotonic() + STOP_WAIT
            with self._lock:
                self._stopping = True
            while time.monotonic() < deadline:
                with self._lock:
                    for ident in self._making - done:
                        if runner.interrupt(ident):
                            done.add(ident)
                alive = [thread for thread in threads if thread.is_alive()]
                if not alive:
                    return
                alive[0].join(_RETRY)
        finally:
            runner.release()
