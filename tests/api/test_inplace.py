"""A thread waiting for a result reads the I/O loop's sockets in its place
(`dispynb._inplace`), met with real sockets, a real loop thread and real signals:
what it reads runs on it, the loop thread is handed the sockets back, other work for
the loop ends the wait, a Ctrl-C meanwhile is raised as it ends, and jobs waited for
that way end with their results and callbacks as before.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dispynb import JobCluster, LocalCluster
from dispynb._inplace import wait_in_place
from dispynb._loop import LoopRunner
from tests.sigint import python_handles_sigint

WAIT = 10.0  # seconds; an upper bound that is only reached when a test fails
LONG = 600.0  # a budget the wait must never use up (pytest-timeout ends it first)


@pytest.fixture
def runner() -> Iterator[LoopRunner]:
    runner = LoopRunner.acquire()
    yield runner
    runner.release()


class Reader:
    """A socket pair whose far end the loop reads; it notes the thread of each
    read and what it read."""

    def __init__(self, runner: LoopRunner) -> None:
        self.runner = runner
        self.near, self.far = socket.socketpair()
        self.far.setblocking(False)
        self.reads: list[tuple[int, bytes]] = []
        self.read_on_loop = threading.Event()
        self.on_read: list[object] = []  # called after each read (on the reader)

        async def register() -> None:
            runner.loop.add_reader(self.far.fileno(), self._readable)

        runner.run_sync(register)

    def _readable(self) -> None:
        data = self.far.recv(4096)
        self.reads.append((threading.get_ident(), data))
        if threading.current_thread().name == "dispynb-io":
            self.read_on_loop.set()
        for action in self.on_read:
            action()  # type: ignore[operator]

    def close(self) -> None:
        async def unregister() -> None:
            self.runner.loop.remove_reader(self.far.fileno())

        self.runner.run_sync(unregister)
        self.near.close()
        self.far.close()


def wait_in_place_when_idle(
    runner: LoopRunner, reader: Reader, data: bytes, done: Callable[[], bool]
) -> None:
    """`wait_in_place` once the loop is idle (the acquire's own callbacks ran);
    ``data`` is sent to ``reader`` once the wait has begun (at its first look at
    ``done``), so that it arrives while this thread has the loop."""
    sent: list[bool] = []

    def send_then_done() -> bool:
        if not sent:
            sent.append(True)
            reader.near.sendall(data)
        return done()

    deadline = time.monotonic() + WAIT
    while not wait_in_place(runner, send_then_done, LONG):
        assert time.monotonic() < deadline, "the loop never went idle"


def test_what_arrives_is_read_on_the_waiting_thread_then_the_loop_reads_again(
    runner,
):
    reader = Reader(runner)
    try:
        wait_in_place_when_idle(runner, reader, b"result", lambda: bool(reader.reads))
        assert reader.reads == [(threading.get_ident(), b"result")]
        # The socket is the loop's again: the loop thread reads what comes next.
        reader.near.sendall(b"later")
        assert reader.read_on_loop.wait(WAIT)
        assert reader.reads[1][1] == b"later"
    finally:
        reader.close()


def test_work_for_the_loop_from_another_thread_ends_the_wait(runner):
    """Another thread's ``call_soon`` wakes the loop: the waiting thread gives it
    back at once (its budget would outlast the test), and the loop runs it."""
    reader = Reader(runner)
    ran = threading.Event()

    def from_another_thread() -> None:
        thread = threading.Thread(target=runner.call_soon, args=(ran.set,))
        thread.start()
        thread.join()

    reader.on_read.append(from_another_thread)
    try:
        wait_in_place_when_idle(runner, reader, b"x", lambda: False)
        assert ran.wait(WAIT)
        assert reader.reads == [(threading.get_ident(), b"x")]
    finally:
        reader.close()


def test_a_callback_scheduled_by_what_was_read_ends_the_wait(runner):
    """What the waiting thread read scheduled a callback (a future completed, as a
    result does): the wait ends and the loop thread runs it."""
    reader = Reader(runner)
    ran = threading.Event()
    reader.on_read.append(lambda: runner.loop.call_soon(ran.set))
    try:
        wait_in_place_when_idle(runner, reader, b"x", lambda: False)
        assert ran.wait(WAIT)
    finally:
        reader.close()


def test_the_wait_ends_when_a_timer_of_the_loop_falls_due(runner):
    """A timer the loop armed (a time limit, a pulse) runs on time: the wait gives
    the loop back when it falls due (its budget would outlast the test)."""
    reader = Reader(runner)
    fired = threading.Event()

    async def arm() -> None:
        runner.loop.call_later(0.2, fired.set)

    try:
        runner.run_sync(arm)
        wait_in_place_when_idle(runner, reader, b"x", lambda: False)
        assert fired.wait(WAIT)
    finally:
        reader.close()


def test_a_ctrl_c_meanwhile_is_raised_as_the_wait_ends(runner):
    """SIGINT while the main thread reads in the loop's place is held (a result is
    never half recorded) and raised once the loop is given back."""
    reader = Reader(runner)
    reader.on_read.append(lambda: signal.raise_signal(signal.SIGINT))
    try:
        with python_handles_sigint(), pytest.raises(KeyboardInterrupt):
            wait_in_place_when_idle(runner, reader, b"x", lambda: False)
        assert reader.reads == [(threading.get_ident(), b"x")]
        assert not runner.in_loop_thread()
        reader.near.sendall(b"after")
        assert reader.read_on_loop.wait(WAIT)
    finally:
        reader.close()


def inc(x: int) -> int:
    return x + 1


@pytest.mark.slow
def test_round_trips_end_with_their_results_and_callbacks_off_the_user_thread():
    """Jobs waited for one by one (W2): each ends with its result, its status
    callbacks still run on the cluster's callback thread, never on the user's."""
    threads: set[int] = set()
    with (
        LocalCluster(cpus=1) as local,
        JobCluster(
            inc,
            nodes=local,
            job_status=lambda job: threads.add(threading.get_ident()),
        ) as cluster,
    ):
        for x in range(100):
            job = cluster.submit(x)
            assert job() == x + 1
            assert job.status.name == "Finished"
        cluster.wait(timeout=WAIT)
    assert threads and threading.get_ident() not in threads
