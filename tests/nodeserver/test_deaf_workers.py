"""Stop kills a worker deaf to SIGINT at once, but only when that is sure to be right.

These races last microseconds on a real node, so they are staged here: a fake
worker whose masks change when it is signalled, and a real socket holding what the
worker sent. `tests/jupyter/test_kernel_stop.py` covers the kill at once end to end.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from types import SimpleNamespace
from typing import Any

import nodeserver.launcher as launcher_module
from nodeserver.compstate import NodeJob, Worker
from nodeserver.jobstops import _JobStops
from nodeserver.launcher import ProcessLauncher


class _SignalledWorker:
    """A held worker that records the signals sent to it."""

    pid = 4242

    def __init__(self) -> None:
        self.signals: list[int] = []

    def signal(self, signum: int) -> None:
        self.signals.append(signum)


def test_a_worker_handed_its_sigint_is_not_taken_for_deaf(monkeypatch):
    # While the kernel hands SIGINT to Python's handler, /proc shows it blocked:
    # the worker reports blocked only once signalled.
    worker = _SignalledWorker()
    monkeypatch.setattr(
        launcher_module, "deaf_to", lambda pid, signum: bool(worker.signals)
    )
    assert ProcessLauncher().interrupt(worker)  # type: ignore[arg-type]
    assert worker.signals == [signal.SIGINT]


class _DeafLauncher:
    """Reports every worker deaf to SIGINT; records the kills."""

    def __init__(self) -> None:
        self.killed: list[Any] = []
        self.kill: asyncio.Future[None] | None = None

    def interrupt(self, worker: Any) -> bool:
        return False

    def kill_group(self, worker: Any) -> None:
        self.killed.append(worker)
        if self.kill is not None and not self.kill.done():
            self.kill.set_result(None)


def _stop(unread: bytes) -> tuple[int, int]:
    """Cancel the job of a deaf worker whose channel holds ``unread`` (what it sent,
    not read yet; its grace 0 s): the kills made at once, and those made once the
    grace ended (the job still its head: its Done never read here)."""
    stops = _JobStops.__new__(_JobStops)
    launcher = _DeafLauncher()
    stops._launcher = launcher  # type: ignore[assignment]
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(unread)
        worker = Worker(
            pid=4242,
            conn=SimpleNamespace(holds_received=False),  # type: ignore[arg-type]
            sock=ours,
            process=SimpleNamespace(pid=4242),  # type: ignore[arg-type]
        )
        job = NodeJob(key=1, attempt=1, buffers=[])
        worker.assigned.append(job)

        async def cancel() -> tuple[int, int]:
            launcher.kill = asyncio.get_running_loop().create_future()
            stops._interrupt(worker, job, grace=0.0)
            at_once = len(launcher.killed)
            await asyncio.wait_for(launcher.kill, 10)
            return at_once, len(launcher.killed)

        return asyncio.run(cancel())


def test_a_deaf_worker_with_nothing_unread_is_killed_at_once():
    assert _stop(b"") == (1, 1)


def test_a_deaf_worker_whose_done_is_unread_is_left_to_the_grace():
    # The cancelled job ended (its Done waits unread) and the job sent ahead,
    # started, made the worker deaf: that job is not the one to kill. The grace's
    # end decides once the Done is read (`_escalate`: here it never is).
    assert _stop(b"done") == (0, 1)
