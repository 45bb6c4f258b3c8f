"""A program that shows a cluster in a web monitor, as a user's script does.

``python -m tests.httpd.monitor_process POLL_SEC``: one local node, one cluster, a
`DispyHTTPServer` on a free port of 127.0.0.1. Prints ``{"port", "token"}`` as one
JSON line, logs to stderr, and stops when its standard input closes.
`started_monitor` runs it for a test.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dispynb import JobCluster, LocalCluster
from dispynb.httpd import DispyHTTPServer
from tests import jobs
from tests.nodeproc import ROOT, node_env


@dataclass
class MonitorProcess:
    proc: subprocess.Popen[str]
    port: int
    token: str
    log: Path

    def get(self, path: str = "/api/cluster", timeout: float = 10) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Authorization": f"Token {self.token}"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()


@contextlib.contextmanager
def started_monitor(tmp_path: Path) -> Iterator[MonitorProcess]:
    """This program in a process of its own, at most 256 descriptors (prlimit),
    logging to ``tmp_path/monitor.log``; stopped at the end."""
    log = tmp_path / "monitor.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            ["prlimit", "--nofile=256", "--", sys.executable, "-m",
             "tests.httpd.monitor_process", "60"],
            cwd=ROOT, env=node_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=stderr, text=True,
        )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        info = json.loads(proc.stdout.readline())
        yield MonitorProcess(proc, info["port"], info["token"], log)
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    poll_sec = float(sys.argv[1])
    with (
        LocalCluster(cpus=1) as local,
        JobCluster(jobs.mark_and_sleep, nodes=local) as cluster,
    ):
        server = DispyHTTPServer(cluster, port=0, poll_sec=poll_sec)
        print(json.dumps({"port": server.port, "token": server.token}), flush=True)
        sys.stdin.read()
        server.shutdown(wait=False)


if __name__ == "__main__":
    main()
