"""Probing nodes before a `Session` uses them: connecting to them once (and
authenticating) to report errors at once and fill the node panel (`_SessionProbes`);
several specs at once, one thread each, ending the probes at once when ``%dispy
nodes a b`` is interrupted (`ParallelProbes`).

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
from contextlib import AbstractContextManager
from typing import Any

from dispynb import _interruptible
from dispynb._interruptible import start_thread
from dispynb._loop import LoopRunner
from dispynb.backends.base import Engine
from dispynb.cluster import ClusterFactory
from dispynb.errors import SetupError
from dispynb.jupyter.widgets import NodePanel

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


class _SessionProbes:
    """A `Session`'s probes of nodes (see `dispynb.jupyter.session`)."""

    # Set by `Session.__init__` (see there).
    nodes: Any
    engine: Engine | None
    options: dict[str, Any]
    cluster_factory: ClusterFactory
    panel: NodePanel

    def _probe_each(
        self, specs: list[str], options: dict[str, Any]
    ) -> tuple[list[str], dict[str, str], Callable[[], None]]:
        """Probe each of ``specs`` on its own (at once, in threads): those that
        answered, why each other one did not, and what shows the nodes met in
        the panel. Raises the error if none answered. Wildcards (discovery) and
        a single spec are probed together, as one cluster. Interrupted, the
        probes end at once (`ParallelProbes`)."""
        from dispynb.errors import DispynbError
        from dispynb.node import is_wildcard, parse_node_specs

        if len(specs) < 2 or any(is_wildcard(s) for s in parse_node_specs(specs)):
            return specs, {}, self._probe(specs, None, options)
        outcomes = ParallelProbes(
            lambda spec, guard: self._probe([spec], None, options, guard), specs
        ).run()
        replays, usable, failed = [], [], {}
        errors: list[BaseException] = []
        for spec, replay, error in outcomes:
            if error is None:
                usable.append(spec)
                replays.append(replay)
            elif isinstance(error, DispynbError | OSError):
                failed[spec] = str(error)
                errors.append(error)
            else:  # an interrupt, a bug: not the node's
                raise error
        if not usable:
            if len(errors) == 1:
                raise errors[0]
            raise DispynbError("; ".join(str(error) for error in errors))

        def replay_all() -> None:
            for each in replays:
                each()

        return usable, failed, replay_all

    def probe(self) -> None:
        """Connect to every node once (authenticating), to fill the node panel and
        report errors now rather than at the first run."""
        self._probe(self.nodes, self.engine, self.options)()

    def _probe(
        self,
        nodes: Any,
        engine: Engine | None,
        options: dict[str, Any],
        guard: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> Callable[[], None]:
        """Probe ``nodes`` (or ``engine``) without touching the session: return
        what shows the nodes it met in the panel, to call once they are in use
        (the nodes in use until then stay as they are). The cluster is made
        inside ``with guard():`` (see `ParallelProbes`)."""
        events: list[tuple[Any, ...]] = []
        with guard():
            try:
                cluster = self.cluster_factory(
                    _dispynb_node_probe, nodes=nodes, engine=engine,
                    cluster_status=lambda *event: events.append(event),
                    **{**options, "recover_file": False},  # a probe leaves no journal
                )  # fmt: skip
            except SetupError as exc:
                mismatch = getattr(exc, "python_mismatch", None)
                if mismatch is None:
                    raise
                # It named this probe, 'defined in this program': the person's
                # code is the notebook's, which travels compiled all the same.
                raise SetupError(_other_python(*mismatch)) from None
        cluster.close()

        def replay() -> None:
            for event in events:
                self.panel.cluster_status(*event)

        return replay


def _other_python(name: str, address: str, theirs: str, ours: str) -> str:
    """Why a node of another Python version cannot run this notebook's functions."""
    version = ".".join(theirs.split(".")[:2])
    return (
        f"node {name!r} ({address}) runs Python {theirs} and this notebook's kernel "
        f"Python {ours}: the functions of a notebook travel as compiled code, which "
        f"only Python {ours} runs. Start dispynb-node there with a Python {ours}, "
        f"or use a kernel of Python {version}"
    )


def _dispynb_node_probe(x: Any) -> Any:
    """The computation of the clusters that only check that the nodes answer (the
    lab panel does not show them: `dispynb.jupyter.labclusters.INTERNAL`)."""
    return x
