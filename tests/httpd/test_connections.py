"""Connections held open by anyone on the machine (no token needed to connect).

The monitor lives in the user's client process: connections it holds are that
process's file descriptors, which its cluster needs too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import tornado.web

from dispynb import JobCluster
from dispynb.httpd import DispyHTTPServer
from dispynb.httpd.connections import MAX_CONNECTIONS, MonitorHTTPServer
from tests.httpd.client import MonitorClient
from tests.httpd.monitor_process import MonitorProcess, started_monitor
from tests.jobs import WAIT

pytestmark = pytest.mark.slow

#: What a process of the monitor may hold besides its connections (its cluster's
#: node connections and pipes, the interpreter's files).
BASE_FDS = 40


def hold(stack: ExitStack, port: int, first_bytes: bytes = b"") -> None:
    sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), 10))
    if first_bytes:
        sock.sendall(first_bytes)


@pytest.fixture
def monitor_process(tmp_path: Path) -> Iterator[MonitorProcess]:
    """A monitor in a process of its own, at most 256 descriptors (prlimit)."""
    with started_monitor(tmp_path) as monitor:
        yield monitor


def test_idle_and_slow_connections_cannot_take_the_processs_descriptors(
    monitor_process: MonitorProcess,
) -> None:
    """300 connections that send nothing, part of a header, or a header announcing
    a body that never comes: the monitor holds at most MAX_CONNECTIONS, serves the
    user meanwhile, and logs nothing about it (it spun on EMFILE, logging a
    traceback per try, and served nobody until the connections timed out)."""
    monitor = monitor_process
    proc = psutil.Process(monitor.proc.pid)
    partial = f"GET /api/cluster HTTP/1.1\r\nHost: 127.0.0.1:{monitor.port}\r\n"
    body = partial + "Content-Length: 1000\r\n\r\n"
    with ExitStack() as stack:
        for n in range(300):
            first = [b"", partial.encode(), body.encode()][n % 3]
            hold(stack, monitor.port, first)
        assert monitor.get() == 200
        assert proc.num_fds() <= BASE_FDS + MAX_CONNECTIONS
    assert monitor.get() == 200
    log = monitor.log.read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-2000:]


def test_a_request_being_answered_is_never_closed_for_a_new_connection(
    server: DispyHTTPServer, client: MonitorClient
) -> None:
    """A long-poll (a browser waiting for a change) outlives a flood of idle
    connections, which close each other instead."""
    version = client.get("/api/cluster").json()["version"]
    answers: list[int] = []
    poll = threading.Thread(
        target=lambda: answers.append(
            client.get(f"/api/cluster?since={version}").status
        )
    )
    poll.start()
    try:
        with ExitStack() as stack:
            for _ in range(3 * MAX_CONNECTIONS):
                hold(stack, server.port)
            assert client.get("/api/cluster").status == 200
    finally:
        poll.join(30)
    assert answers == [200]


class _OutOfDescriptors(socket.socket):
    """A listening socket whose first accepts fail as at the descriptor limit."""

    failures = 3

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


class _Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("hello")


def test_out_of_descriptors_pauses_accepting_then_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no connection to close, an accept failing on EMFILE pauses the listener
    (one warning, one line when it ends) instead of retrying at once in a loop."""
    caplog.set_level(logging.INFO, "dispynb.httpd")
    listener = _OutOfDescriptors(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def visit() -> bytes:
        server = MonitorHTTPServer(tornado.web.Application([(r"/", _Hello)]))
        server.add_sockets([listener])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 20)
            writer.close()
            return answer
        finally:
            server.stop()
            await server.close_all_connections()

    answer = asyncio.run(visit())
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello")
    lines = [r.getMessage() for r in caplog.records if r.name == "dispynb.httpd"]
    assert len(lines) == 2, lines
    assert "paused" in lines[0] and "Too many open files" in lines[0]
    assert "accepting connections again" in lines[1] and "(3 failed" in lines[1]


def test_shutdown_ends_in_time_with_clients_that_never_read(
    cluster: JobCluster,
) -> None:
    """60 clients pipeline snapshot requests and never read the answers; shutdown
    ends within its bound (it raised TimeoutError after poll_sec + 30 s: tornado
    closed the connections one at a time, serving the others meanwhile, and ran a
    handler for each request a closed connection had left in its buffer)."""
    server = DispyHTTPServer(cluster, port=0, poll_sec=1)
    try:
        # Enough finished jobs that a snapshot costs something.
        assert cluster.wait(timeout=WAIT)
        done = [cluster.submit(None, 0) for _ in range(1000)]
        assert cluster.wait(timeout=WAIT) and all(job.done() for job in done)
        request = (
            f"GET /api/cluster?max_jobs=5000 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Token {server.token}\r\n\r\n"
        ).encode() * 50
        with ExitStack() as stack:
            socks = []
            for _ in range(60):
                sock = socket.create_connection(("127.0.0.1", server.port), 10)
                stack.enter_context(sock)
                sock.setblocking(False)
                socks.append(sock)
            # Fill the pipes: the server answers until its writes block.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                for sock in socks:
                    with contextlib.suppress(BlockingIOError):
                        sock.send(request)
                select.select([], socks, [], 0.05)
            server.shutdown()  # raised TimeoutError
    finally:
        server.shutdown(wait=False)
