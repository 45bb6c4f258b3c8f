"""Start ``python -m nodeserver`` processes from the command line, as a user would.

Every node listens on 127.0.0.1 with port 0; its log goes to a file next to it; every
wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Seconds a node gets to start listening or to stop.
NODE_WAIT = 20.0


def node_env() -> dict[str, str]:
    """This environment without any ``DISPYNB_*`` setting, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPYNB_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    return env


def inner_pytest(*tests: str) -> list[str]:
    """``python -m pytest -q`` on ``tests`` (paths from the checkout, ``::name`` if
    any), given by absolute path to run in this process's current directory: the
    checkout, or the scratch directory of a second run (tests/alongside.py), so that
    its check against recovery files left in the current directory watches this
    run's directory, not the main run's."""
    config = ["--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")]
    targets = [str(ROOT / test) for test in tests]
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return [*pytest, *config, *targets]


def node_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nodeserver", *args]


def write_secret_file(path: Path, secret: str, mode: int = 0o600) -> Path:
    path.write_text(secret + "\n")
    path.chmod(mode)
    return path


@dataclass
class CliNode:
    """A node server started from the command line."""

    proc: subprocess.Popen[bytes]
    port: int
    secret: str
    secret_file: Path
    log: Path

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the node and return its exit status (killed after `NODE_WAIT`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(NODE_WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"node did not stop within {NODE_WAIT} s of signal {signum}"
            ) from None


def start_node(
    directory: Path,
    *args: str,
    secret: str = "cli-node-secret",
    name: str = "cli-node",
    cpus: int = 1,
    launcher: Sequence[str] = (),
    secret_in_env: bool = False,
    stdin: int = subprocess.DEVNULL,
) -> CliNode:
    """Start a node in ``directory`` with a 0600 secret file; wait until it listens.

    ``secret_in_env``: the node gets the secret in ``DISPYNB_SECRET`` instead.

    ``stdin``: what the node reads commands from (`subprocess.PIPE`: write them to
    ``proc.stdin``); its answers go to the log with its log lines.

    ``launcher`` is put before the command, e.g. ``["prlimit", "--nofile=256"]``
    (a program that execs the rest, so ``proc.pid`` stays the node's pid).
    """
    directory.mkdir(parents=True, exist_ok=True)
    secret_file = write_secret_file(directory / "secret", secret)
    port_file = directory / "port"
    log = directory / "node.log"
    command = [*launcher, *node_command(
        "--host", "127.0.0.1",  # loopback: no discovery, nothing leaves the machine
        "--port", "0",
        "--port-file", str(port_file),
        *([] if secret_in_env else ["--secret-file", str(secret_file)]),
        "--cpus", str(cpus),
        "--name", name,
        "--dest-path", str(directory / "dest"),
        "--loglevel", "info",
        *args,
    )]  # fmt: skip
    env = node_env()
    if secret_in_env:
        env["DISPYNB_SECRET"] = secret
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            command,
            env=env,
            stdin=stdin,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + NODE_WAIT
    while not port_file.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"node exited with {proc.returncode}:\n{log.read_text()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"node did not listen within {NODE_WAIT} s")
        time.sleep(0.01)
    return CliNode(proc, int(port_file.read_text()), secret, secret_file, log)


@contextlib.contextmanager
def running_node(directory: Path, *args: str, **kwargs: object) -> Iterator[CliNode]:
    """`start_node`, stopped with SIGTERM at the end."""
    node = start_node(directory, *args, **kwargs)  # type: ignore[arg-type]
    try:
        yield node
    finally:
        node.stop()


@contextlib.contextmanager
def running_node_without_secret(directory: Path) -> Iterator[str]:
    """A node started without a secret (127.0.0.1, its own user only); yields its
    ``HOST:PORT``; terminated at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    port_file = directory / "port"
    proc = subprocess.Popen(
        node_command(
            "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
            "--cpus", "1", "--dest-path", str(directory / "dest"),
        ),
        env=node_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + NODE_WAIT
        while not port_file.exists():
            assert proc.poll() is None, "the node without a secret did not start"
            assert time.monotonic() < deadline, "the node without a secret hangs"
            time.sleep(0.01)
        yield f"127.0.0.1:{port_file.read_text().strip()}"
    finally:
        proc.terminate()
        proc.wait(NODE_WAIT)
