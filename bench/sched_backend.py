"""dispynb through a shared scheduler: the W1/W2 rows "dispynb-scheduler" (issue 16).

The same `LocalCluster` node as the ``dispynb`` row, owned by a ``dispynb-scheduler``
process on 127.0.0.1 (one user, its credential written by ``dispynb-scheduler user
add``); each function gets a ``SharedJobCluster(fn, scheduler_host=...)``. The
difference from the ``dispynb`` row is the scheduler's hop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backends import DispynbBackend

ROOT = Path(__file__).resolve().parents[1]

#: Seconds the scheduler gets to start.
START_WAIT = 20.0


class DispynbSchedulerBackend(DispynbBackend):
    """dispynb's `SharedJobCluster` through ``dispynb-scheduler`` (one user)."""

    name = "dispynb-scheduler"
    map_calls = None  # W8 is dispynb's own nodes against ProcessPoolExecutor
    journal_round = None  # W9 is dispynb's own nodes, with and without it

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._dir = tempfile.mkdtemp(prefix="dispynb-bench-sched-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._address = ""
        self._credential = os.path.join(self._dir, "bench.credential")

    def start(self) -> None:
        super().start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPYNB_")}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), env.get("PYTHONPATH")) if p
        )
        users = os.path.join(self._dir, "users")
        command = [sys.executable, "-m", "schedserver"]
        subprocess.run(
            [
                *command,
                "user",
                "add",
                "bench",
                "--users",
                users,
                "-o",
                self._credential,
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        port_file = os.path.join(self._dir, "port")
        args = ["--users", users, "-p", "0", "--port_file", port_file]
        for spec in self._local.node_specs():
            args += ["-n", spec]
        env["DISPYNB_SECRET"] = self._local.secret
        log = open(os.path.join(self._dir, "scheduler.log"), "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [*command, *args, "--loglevel", "warning"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + START_WAIT
        while not os.path.exists(port_file):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dispynb-scheduler did not start")
            time.sleep(0.02)
        with open(port_file) as handle:
            self._address = f"127.0.0.1:{int(handle.read())}"

    def close(self) -> None:
        self._cluster_stack.close()
        self._cluster = self._fn = None
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(20)
            self._proc = None
        super().close()

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["config"] += "; SharedJobCluster through dispynb-scheduler"
        return described

    def _cluster_for(self, fn: Any) -> Any:
        if self._fn is fn:
            return self._cluster
        from dispynb import SharedJobCluster

        self._cluster_stack.close()
        self._cluster = self._fn = None
        self._cluster = self._cluster_stack.enter_context(
            SharedJobCluster(
                fn, scheduler_host=self._address, secret_file=self._credential
            )
        )
        self._fn = fn
        return self._cluster
