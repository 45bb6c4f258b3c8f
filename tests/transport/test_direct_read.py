"""A thread that took the I/O loop's place reads a socket link itself
(`SocketLink.hide` / `read_now` / `show`, `LoopRunner.wait_readable`): what a job's
waiting thread does while the loop is idle, so that a result wakes no other thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dispynb._loop import LoopRunner
from dispynb.errors import FramingError
from dispynb.protocol.framing import Frame, FrameDecoder, encode_frames
from dispynb.transport.links import SocketLink

WAIT = 5.0  # seconds; reached only when a test fails


class Sink:
    """Records each frame's payload with the thread that received it."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(1 << 20)
        self.frames: list[tuple[bytes, int]] = []
        self.lost: list[BaseException | None] = []
        self.arrived = threading.Event()

    def frames_received(self, frames: list[Frame]) -> None:
        for _prefix, _count, body in frames:
            self.frames.append((bytes(body[4:]), threading.get_ident()))
        self.arrived.set()

    def framing_failed(self, exc: FramingError) -> None:
        raise AssertionError(exc)

    def link_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.arrived.set()


def frame(payload: bytes) -> bytes:
    head, buffers = encode_frames([payload])
    return head + b"".join(bytes(b) for b in buffers)


@pytest.fixture
def runner() -> Iterator[LoopRunner]:
    runner = LoopRunner.acquire()
    yield runner
    runner.release()


@pytest.fixture
def pair(runner: LoopRunner) -> Iterator[tuple[SocketLink, socket.socket, Sink]]:
    ours, peer = socket.socketpair()
    sink = Sink()

    async def make() -> SocketLink:
        return SocketLink(ours, sink)

    link = runner.run_sync(make)
    yield link, peer, sink
    runner.call_soon(link.close)
    peer.close()


def enter_when_idle(runner: LoopRunner) -> None:
    deadline = time.monotonic() + WAIT
    while not runner.enter():
        assert time.monotonic() < deadline, "the loop never went idle"


def loop_thread(runner: LoopRunner) -> int:
    async def ident() -> int:
        return threading.get_ident()

    return runner.run_sync(ident)


def test_the_entered_thread_reads_a_hidden_link_and_the_loop_reads_it_once_shown(
    runner, pair
):
    link, peer, sink = pair
    enter_when_idle(runner)
    try:
        fd = link.hide()
        assert fd is not None
        assert link.hide() is None  # once
        peer.sendall(frame(b"first"))
        assert runner.wait_readable([fd], WAIT) == [fd]
        link.read_now()
    finally:
        link.show()
        runner.leave()
    assert sink.frames == [(b"first", threading.get_ident())]
    sink.arrived.clear()
    peer.sendall(frame(b"second"))
    assert sink.arrived.wait(WAIT)
    assert sink.frames[1] == (b"second", loop_thread(runner))


def test_reading_paused_while_hidden_stays_paused_once_shown(runner, pair):
    link, peer, sink = pair
    enter_when_idle(runner)
    try:
        assert link.hide() is not None
        link.pause_reading()
    finally:
        link.show()
        runner.leave()

    async def has_reader() -> bool:
        return asyncio.get_running_loop().remove_reader(link.fileno)

    assert runner.run_sync(has_reader) is False  # no reader came back
    peer.sendall(frame(b"later"))
    runner.call_soon(link.resume_reading)
    assert sink.arrived.wait(WAIT)
    assert sink.frames == [(b"later", loop_thread(runner))]


def test_a_link_lost_while_read_by_the_entered_thread_is_not_shown_again(runner, pair):
    link, peer, sink = pair
    enter_when_idle(runner)
    try:
        fd = link.hide()
        assert fd is not None
        peer.close()
        assert runner.wait_readable([fd], WAIT) == [fd]
        link.read_now()
        assert link.closed
    finally:
        link.show()
        runner.leave()
    assert sink.lost == [None]
    assert runner.run_sync(asyncio.sleep, 0) is None  # the loop goes on
