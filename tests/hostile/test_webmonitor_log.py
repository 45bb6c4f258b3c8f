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
    counted = re.findall(r"(\d+) more refused web requests", monitor.log.read_text())
    measure(
        f"{refused} of {CONNECTIONS * REQUESTS} refused; {lines} log lines about "
        f"them; the user's request: {status}; at the stop: {counted} more counted"
    )
    assert refused == CONNECTIONS * REQUESTS and status == 200
    assert lines <= 4  # 3 at once, then (past a minute) one with the count
    assert lines + sum(map(int, counted)) == refused  # every one logged or counted
