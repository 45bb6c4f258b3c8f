"""Stop kills a worker deaf to SIGINT at once, but only when that is sure to be right.

These races last microseconds on a real node, so they are staged here: a fake
worker whose masks change when it is signalled, and a real socket holding what the
worker sent. `tests/jupyter/test_kernel_stop.py` covers the kill at once end to end.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
import socket
import threading
from types import SimpleNamespace
from typing import Any

import nodeserver.launcher as launcher_module
from dispynb.protocol import serialize
from dispynb.protocol.messages import CANCELLED, FINISHED
from nodeserver.channel import MessageSocket
from nodeserver.compstate import NodeJob, Worker
from nodeserver.ipc import InterruptPage, Run
from nodeserver.jobapi import CONTEXT
from nodeserver.jobrunner import worker_loop
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


def _stop(unread: bytes, all_sent: bool = True) -> tuple[int, int]:
    """Cancel the job of a deaf worker whose channel holds ``unread`` (what it sent,
    not read yet; its grace 0 s): the kills made at once, and those made once the
    grace ended (the job still its head: its Done never read here)."""
    stops = _JobStops.__new__(_JobStops)
    launcher = _DeafLauncher()
    stops._launcher = launcher  # type: ignore[assignment]
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(unread)
        conn = SimpleNamespace(holds_received=False, all_sent=all_sent)
        worker = Worker(
            pid=4242,
            conn=conn,  # type: ignore[arg-type]
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


def test_a_deaf_worker_without_a_page_whose_skips_wait_is_left_to_the_grace():
    # No interrupt page: only Skips in its socket keep the worker from starting a
    # job sent ahead as the cancelled one ends; one still in the node's buffer
    # (the socket full) may come too late, and a kill at once could hit that job.
    assert _stop(b"", all_sent=False) == (0, 1)


def test_a_deaf_worker_whose_done_is_unread_is_left_to_the_grace():
    # The cancelled job ended (its Done waits unread) and the job sent ahead,
    # started, made the worker deaf: that job is not the one to kill. The grace's
    # end decides once the Done is read (`_escalate`: here it never is).
    assert _stop(b"done") == (0, 1)


_RUNNING = threading.Event()
_RELEASE = threading.Event()


def _held_then_doubled(x: int) -> int:
    """Job 1 waits for the test (as a job deaf to SIGINT runs on); others return."""
    if x == 1:
        _RUNNING.set()
        _RELEASE.wait(10)
    return 2 * x


def test_a_worker_whose_job_was_interrupted_starts_no_job_sent_ahead():
    # The node names the job it stops on the worker's page, then, the job deaf,
    # kills the worker at once. If the job ends just between (its Done not sent
    # yet when the node looked), the worker must not start the job sent ahead:
    # its Skip may still wait in the node's buffer (the socket full of others'
    # arguments), and the kill would hit that job, which runs again elsewhere.
    # Staged: the Skip never comes; the page alone must stop the job behind.
    server, worker = socket.socketpair()
    server.settimeout(10)
    client = MessageSocket(server)
    _RUNNING.clear()
    _RELEASE.clear()
    thread = threading.Thread(
        target=worker_loop, args=(MessageSocket(worker, fds=True), _held_then_doubled)
    )
    page_fd = os.memfd_create("test-interrupt-page")
    os.ftruncate(page_fd, mmap.PAGESIZE)
    page = memoryview(mmap.mmap(page_fd, 8)).cast("q")
    thread.start()
    try:
        client.send(InterruptPage(), fds=[page_fd])
        client.send(Run(key=1, attempt=1), serialize.dumps(((1,), {})))
        assert _RUNNING.wait(10)
        client.send(Run(key=2, attempt=1, ahead=True), serialize.dumps(((2,), {})))
        page[0] = 1  # the node stops Run 1 (the worker here gets no SIGINT)
        _RELEASE.set()  # the job ends as it is stopped
        replies = [client.recv()[0] for _ in range(2)]
    finally:
        _RELEASE.set()
        client.close()
        thread.join(timeout=10)
        CONTEXT.target = None
        page.release()
        os.close(page_fd)
        worker.close()
    assert not thread.is_alive()
    assert [(done.key, done.outcome) for done in replies] == [
        (1, FINISHED),
        (2, CANCELLED),
    ], "the job sent ahead started on the worker the node was killing"
