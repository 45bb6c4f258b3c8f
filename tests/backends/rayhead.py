"""A real Ray cluster for tests: ``ray start --head`` (and more nodes) on loopback.

Only ever used inside the private network and PID namespaces that
`tests/backends/test_ray_netns.py` makes (``unshare -n -p -f --mount-proc``): there
``ray stop --force`` sees only this run's Ray processes, and whatever is left dies
with the namespace. The cluster uses token authentication (Ray's default for ``ray
start``) with a token of its own, never the machine's ``~/.ray``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

#: The ``ray`` command of this interpreter's environment.
RAY = str(Path(sys.executable).with_name("ray"))

#: Put first on the ``PYTHONPATH`` of Ray's processes: its ``sitecustomize`` spares
#: each the import that cost most of a dashboard agent's start (see there).
STARTUP = Path(__file__).with_name("raystart")

#: Seconds ``ray start`` may take (it gives up after 30 s waiting for its raylet
#: on a loaded machine: then it is tried once more).
START_TIMEOUT = 150.0

#: A raylet log's line saying why it aborted (glog's fatal lines, a failed check).
_FATAL = re.compile(r"Check failed|FATAL|\*\*\* SIG|,\d{3} F \d|^F\d{4} ")


#: ``nice`` adjustment of the Ray processes (a higher priority when run as root).
PRIORITY = -10 if os.geteuid() == 0 else 0


def free_port() -> int:
    """A port nothing had bound a moment ago. Another process may take it before
    Ray's head binds it (Ray is given the port and checks and binds it its own way:
    not held as `tests.ports` holds ports for dispynb's servers): `_start` tries
    again on another."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RayHead:
    """A Ray cluster started with ``ray start``; `stop` ends all of it."""

    address: str
    env: dict[str, str]
    temp_dir: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def start(cls, cpus: int = 2) -> RayHead:
        """Start a head node with ``cpus`` CPUs on 127.0.0.1."""
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # Agents register late on a loaded machine.
            "RAY_agent_register_timeout_ms": "120000",
            # The GCS finds a killed node after 5 failed health checks (Ray's
            # health_check_failure_threshold): one every 0.5 s instead of every 3 s
            # (kill_node's tests waited ~15 s each). A live but slow node is not
            # declared dead any sooner: a check fails only after its own timeout
            # (health_check_timeout_ms).
            "RAY_health_check_period_ms": "500",
            # A live raylet starved of CPU on a loaded machine (one took 10.5 s to
            # handle a reply in a CI run) failed its checks after Ray's 10 s, was
            # declared dead and exited: each of three nodes added in a row. A
            # killed node's checks fail at once (connection refused), not on this.
            "RAY_health_check_timeout_ms": "60000",
            # A dashboard agent that has not written its ports 15 s after its
            # raylet started (a fixed wait) aborts the raylet: 10-13 s at a load
            # of 12 on 2 CPUs, 3-4 s with this (ray start: 34 s, 12 s).
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(STARTUP), os.environ.get("PYTHONPATH")])
            ),
        }
        # Short: Ray's Unix socket paths live under it.
        temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")

        def command(port: int) -> list[str]:
            return [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                f"--num-cpus={cpus}",
                "--include-dashboard=false",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
            ]

        port = _start(command, env)
        return cls(f"127.0.0.1:{port}", env, temp_dir)

    def add_node(self, cpus: int) -> subprocess.Popen[bytes]:
        """Start one more Ray node (``ray start --address ... --block``); kill it
        with `kill_node` to make it die."""
        proc = subprocess.Popen(
            [
                "nice",
                "-n",
                str(PRIORITY),
                RAY,
                "start",
                f"--address={self.address}",
                f"--num-cpus={cpus}",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                "--block",
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def kill_node(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill a node of `add_node` at once (SIGKILL to ``ray start``, its raylet
        and the raylet's workers), as when a machine goes down."""
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = [psutil.Process(proc.pid)]
            tree += tree[0].children(recursive=True)
            for process in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def raylet_logs(self, lines: int = 15) -> str:
        """Each raylet's log of this cluster: why one ended (its fatal lines: an
        abort's stack trace fills the last ones), then its last ``lines``."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/raylet*.out"))
        parts = []
        for log in logs:
            text = log.read_text(errors="replace").splitlines()
            fatal = [line for line in text if _FATAL.search(line)][:5]
            parts.append("\n".join([f"== {log.name}", *fatal, *text[-lines:]]))
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.workers:
            self.kill_node(proc)
        subprocess.run(
            [RAY, "stop", "--force"],
            env=self.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.temp_dir, ignore_errors=True)


#: What Ray's helper processes import first: loaded once before ``ray start``, so
#: that they start from the page cache. The raylet aborts if its dashboard agent
#: has not written its ports within 15 s (fixed in Ray 2.60), which a cold import on a
#: loaded machine can exceed.
_WARM = "import ray.dashboard.agent, ray._private.runtime_env.agent.main"


def _start(command: Callable[[int], list[str]], env: dict[str, str]) -> int:
    """Run ``ray start`` (``command(port)``) until it starts; return its port, a
    fresh one at each attempt (the last one's may have been taken meanwhile)."""
    for attempt in (1, 2, 3):
        port = free_port()
        subprocess.run(
            [sys.executable, "-c", _WARM], env=env, capture_output=True, timeout=120
        )
        # Ray's processes get ahead of the machine's other work (root may raise a
        # priority), so that the agents start within the raylet's fixed 15 s.
        proc = subprocess.run(
            ["nice", "-n", str(PRIORITY), *command(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        if proc.returncode == 0:
            return port
        subprocess.run(
            [RAY, "stop", "--force"], env=env, capture_output=True, timeout=60
        )
        if attempt == 3:
            raise RuntimeError(f"ray start failed:\n{proc.stdout}\n{proc.stderr}")
