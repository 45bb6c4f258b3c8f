"""Requests refused by the web monitor, each of which wrote a line to its log.

The monitor logs its requests (tornado's access log, at INFO from status 400 on):
anyone on the machine could write a line to the log of the monitor's process (a
`dispynb-scheduler --httpd`, which logs at INFO) per refused request, as fast as it
could send them.
"""

from __future__ import annotations

import re
import socket

import pytest

from tests.hostile.tools import count_lines
from tests.httpd.monitor_process import started_monitor

pytestmark = pytest.mark.slow

#: Connections, and refused requests sent on each (their answers read).
CONNECTIONS = 10
REQUESTS = 200


def _refused_requests(port: int) -> int:
    """Send `REQUESTS` requests without the token on each of `CONNECTIONS`
    connections, reading every answer; return how many were refused."""
    request = (f"GET /api/cluster HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode(
        "latin-1"
    )
    refused = 0
    for _ in range(CONNECTIONS):
        with socket.create_connection(("127.0.0.1", port), 10) as sock:
            sock.sendall(request * REQUESTS)
            got = b""
            while got.count(b"HTTP/1.1 403") < REQUESTS:
                data = sock.recv(1 << 16)
                if not data:
                    break
                got += data
            refused += got.count(b"HTTP/1.1 403")
    return refused


@pytest.mark.attack(
    id="webmon-log-flood",
    title=f"{CONNECTIONS * REQUESTS:,} requests without the token to a web monitor "
    "whose process logs at INFO",
    goal="all refused; at most 3 log lines for them, then one line a minute, and "
    "one with the count left when the monitor stops (was: 2,000 lines; then the "
    "count left was never logged)",
)
@pytest.mark.timeout(120)
def test_refused_requests_cannot_flood_the_log(measure, tmp_path) -> None:
    with started_monitor(tmp_path) as monitor:
        refused = _refused_requests(monitor.port)
        status = monitor.get()
        lines = count_lines(monitor.log, "403")
    counted = re.findall(r"refused web requests: (\d+) more", monitor.log.read_text())
    measure(
        f"{refused} of {CONNECTIONS * REQUESTS} refused; {lines} log lines about "
        f"them; the user's request: {status}; at the stop: {counted} more counted"
    )
    assert refused == CONNECTIONS * REQUESTS and status == 200
    assert lines <= 4  # 3 at once, then (past a minute) one with the count
    assert lines + sum(map(int, counted)) == refused  # every one logged or counted


#: Requests tornado drops, each with a line of its own in the log (was).
MALFORMED = {
    "request line": b"GARBAGE\r\n\r\n",
    "header": b"GET / HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
    "content length": b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    "headers over 64 KiB": b"GET / HTTP/1.1\r\nX: " + b"a" * (1 << 17) + b"\r\n\r\n",
    "chunk size": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}
#: Connections sending each kind.
MALFORMED_EACH = 100


def _send_malformed(port: int) -> int:
    """Send each kind of `MALFORMED` request on connections of its own (their end
    read); return how many the monitor closed."""
    closed = 0
    for request in MALFORMED.values():
        for _ in range(MALFORMED_EACH):
            with socket.create_connection(("127.0.0.1", port), 10) as sock:
                try:
                    sock.sendall(request)
                    while sock.recv(1 << 16):
                        pass
                except ConnectionResetError:
                    pass
                closed += 1
    return closed


@pytest.mark.attack(
    id="webmon-malformed-flood",
    title=f"{len(MALFORMED) * MALFORMED_EACH} malformed requests (request line, "
    "headers, lengths, headers over the limit) to a web monitor whose process logs "
    "at INFO",
    goal="at most 3 log lines for them, and one with the count left when the "
    "monitor stops (was: a line each, from tornado); the user's request served",
)
@pytest.mark.timeout(120)
def test_malformed_requests_cannot_flood_the_log(measure, tmp_path) -> None:
    with started_monitor(tmp_path) as monitor:
        closed = _send_malformed(monitor.port)
        status = monitor.get()
    lines = count_lines(monitor.log, "tornado|dropped")
    counted = re.findall(
        r"web connections dropped: (\d+) more", monitor.log.read_text()
    )
    measure(
        f"{closed} connections closed; {lines} log lines about them, "
        f"{sum(map(int, counted))} more counted at the stop; the user's request: "
        f"{status}"
    )
    assert closed == len(MALFORMED) * MALFORMED_EACH and status == 200
    assert lines <= 4  # 3 at once, the count at the stop
    assert lines - len(counted) + sum(map(int, counted)) == closed
