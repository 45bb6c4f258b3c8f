"""Connections to the web monitor that ask and never read the answers.

The monitor holds at most 64 connections and, to take a new one, closes the one
that has waited longest for a request; a connection whose request is being answered
is never closed (a browser's long-poll). A peer without the token can make every
one of its connections one being answered: it pipelines requests that are refused
(each refusal a few hundred bytes, or as long as the Host it echoes) and reads
none, so the answer can never be written out.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack

import psutil
import pytest

from dispynb.httpd.connections import MAX_CONNECTIONS
from tests.httpd.monitor_process import started_monitor

pytestmark = pytest.mark.slow

#: Connections the attacker opens, and refused requests pipelined on each.
CONNECTIONS = 2 * MAX_CONNECTIONS
REQUESTS = 200


@pytest.mark.attack(
    id="webmon-never-reading",
    title=f"{CONNECTIONS} connections to a monitor, each pipelining {REQUESTS} "
    "requests without the token and never reading the refusals",
    goal=f"at most {MAX_CONNECTIONS} held; the user is served meanwhile (was: every "
    "connection busy, the user's reset)",
)
@pytest.mark.timeout(120)
def test_peers_that_never_read_cannot_lock_the_user_out(measure, tmp_path) -> None:
    with started_monitor(tmp_path) as monitor:
        proc = psutil.Process(monitor.proc.pid)
        host = f"127.0.0.1:{monitor.port}"
        request = f"GET /api/cluster HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        with ExitStack() as stack:
            for _ in range(CONNECTIONS):
                sock = stack.enter_context(socket.socket())
                # A small window: the refusals back up after a few kB.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(10)
                sock.connect(("127.0.0.1", monitor.port))
                sock.sendall(request * REQUESTS)
            try:
                status: int | str = monitor.get(timeout=10)
            except OSError as exc:  # what the user meets
                status = f"{type(exc).__name__}: {exc}"
            held = sum(
                1
                for c in proc.net_connections("tcp")
                if c.laddr.port == monitor.port and c.status == psutil.CONN_ESTABLISHED
            )
    measure(f"{held} connections held of {CONNECTIONS}; the user's request: {status}")
    assert status == 200
    assert held <= MAX_CONNECTIONS + 1  # (+ the user's, if still open)
