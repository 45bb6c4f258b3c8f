"""A ``dispynb-node`` run in a terminal, as the README starts one: Ctrl-C there
drains it, and a job that reads the terminal fails instead of hanging.

The node runs in a pseudo-terminal it controls, as the foreground job of a shell;
Ctrl-C is typed into the terminal (the byte ``\\x03``), so that the terminal sends
SIGINT to its foreground process group, as it does for a user.
"""

from __future__ import annotations

import contextlib
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.jobs import WAIT
from tests.nodeproc import NODE_WAIT, node_command, node_env, write_secret_file

pytestmark = pytest.mark.slow

SECRET = "terminal-node-secret"


@dataclass
class TerminalNode:
    """A node whose controlling terminal is ``master``'s pseudo-terminal."""

    proc: subprocess.Popen[bytes]
    master: int
    spec: str
    log: Path

    def type(self, keys: bytes) -> None:
        """Type ``keys`` into the node's terminal."""
        os.write(self.master, keys)


#: ``TERMINAL COMMAND...``: in a new session, open the terminal (it becomes the
#: session's controlling terminal, as a shell's is for the jobs it starts) as
#: stdin, then exec the command (the node: its pid is this process's).
TAKE_THE_TERMINAL = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.dup2(fd, 0)
os.close(fd)
os.execvp(sys.argv[2], sys.argv[2:])
"""


@contextlib.contextmanager
def node_in_a_terminal(directory: Path) -> Iterator[TerminalNode]:
    """A node listening on 127.0.0.1, in the foreground of a terminal of its own."""
    directory.mkdir(parents=True)
    secret_file = write_secret_file(directory / "secret", SECRET)
    port_file, log = directory / "port", directory / "node.log"
    command = node_command(
        "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
        "--secret-file", str(secret_file), "--cpus", "1",
        "--dest-path", str(directory / "dest"), "--loglevel", "info",
    )  # fmt: skip
    master, slave = pty.openpty()
    terminal = os.ttyname(slave)
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-c", TAKE_THE_TERMINAL, terminal, *command],
            env=node_env(),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    os.close(slave)
    try:
        deadline = time.monotonic() + NODE_WAIT
        while not port_file.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        spec = f"127.0.0.1:{port_file.read_text().strip()}"
        yield TerminalNode(proc, master, spec, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait(NODE_WAIT)
        os.close(master)


def nap(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "slept"


def read_the_terminal() -> str:
    with open("/dev/tty") as terminal:  # as getpass, ssh or sudo do to ask
        return terminal.readline()


def test_ctrl_c_in_the_nodes_terminal_lets_its_running_job_finish(tmp_path: Path):
    """Before, the terminal's SIGINT reached the node's computation processes too
    (its foreground process group), which stopped their workers: the job ended
    Abandoned, 'killed by the stop signal, not drained', though the node and
    the README promise that Ctrl-C drains."""
    with (
        node_in_a_terminal(tmp_path / "node") as node,
        JobCluster(nap, nodes=[node.spec], secret=SECRET) as cluster,
    ):
        job = cluster.submit(2.0)
        deadline = time.monotonic() + WAIT
        while job.status != DispyJob.Running:
            assert time.monotonic() < deadline, job.status
            time.sleep(0.01)
        node.type(b"\x03")  # Ctrl-C
        assert job.wait(timeout=WAIT)
        assert (job.status, job.result) == (DispyJob.Finished, "slept"), job.exception
        assert node.proc.wait(NODE_WAIT) == 0
    log = node.log.read_text()
    assert "draining" in log and "not drained" not in log, log


def test_a_job_reading_the_nodes_terminal_fails_instead_of_hanging(tmp_path: Path):
    """Before, its worker, in the terminal's session but not its foreground, was
    stopped by SIGTTIN as it read: the job stayed Running for ever."""
    with (
        node_in_a_terminal(tmp_path / "node") as node,
        JobCluster(read_the_terminal, nodes=[node.spec], secret=SECRET) as cluster,
    ):
        job = cluster.submit()
        assert job.wait(timeout=WAIT), "the job hangs"
        assert job.status == DispyJob.Terminated
        assert "/dev/tty" in job.exception, job.exception
