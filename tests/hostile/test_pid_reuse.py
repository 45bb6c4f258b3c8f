"""A node kills a worker's processes only while the pid it knows is that worker's.

Workers are forked by their computation process, not by the node, which learns of
a worker's death by a message: a kill the node decided before reading it (a
cancel's grace that ran out while the node was paused or busy) would go to a pid
that may be an unrelated process's by then, with its children and its process
group. A real node in a pid namespace of the test's own (`tests.hostile.pidns_host`)
is paused while its worker dies and an unrelated process takes the pid.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from nodeserver.jobstops import CANCEL_GRACE
from tests.hostile.tools import WAIT, strong_secret, wait_for
from tests.nodeproc import ROOT, node_env

pytestmark = pytest.mark.slow


def wait_for_cancel(directory: str) -> None:
    """Record this worker's pid; on the cancel's KeyboardInterrupt record that,
    and go on (until the node kills the worker)."""
    Path(directory, "pid.tmp").write_text(str(os.getpid()))
    os.replace(Path(directory, "pid.tmp"), Path(directory, "pid"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            time.sleep(deadline - time.monotonic())
        except KeyboardInterrupt:
            Path(directory, "interrupted").touch()


def _pid_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True
    )
    return done.returncode == 0


class Namespace:
    """`tests.hostile.pidns_host` in a new pid namespace, asked by lines."""

    def __init__(self, directory: Path, secret: str) -> None:
        self.proc = subprocess.Popen(
            [
                "unshare", "-p", "-f", "--mount-proc", "--kill-child",
                sys.executable, "-m", "tests.hostile.pidns_host",
                str(directory), secret,
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=node_env(),
        )  # fmt: skip
        self._pending = b""

    def read(self) -> str:
        """The next line it writes (fails after `WAIT` seconds)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + WAIT
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"pid namespace host silent for {WAIT} s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError("pid namespace host exited")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        reply = self.read()
        assert not reply.startswith("error"), f"{command}: {reply}"
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"exit\n")
            self.proc.stdin.close()
            self.proc.wait(WAIT)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.mark.attack(
    id="worker-pid-reuse",
    title="A worker dies while its node is paused; an unrelated process group takes "
    "its pid before the node's kill of it falls due",
    goal="the unrelated process and its group survive",
)
def test_a_dead_workers_reused_pid_is_not_killed(tmp_path, measure):
    if not _pid_namespaces():
        pytest.skip("needs root and unshare for a pid namespace")
    secret = strong_secret()
    namespace = Namespace(tmp_path / "node", secret)
    try:
        port = int(namespace.read().removeprefix("port "))
        with JobCluster(
            wait_for_cancel, nodes=[f"127.0.0.1:{port}"], secret=secret
        ) as cluster:
            job = cluster.submit(str(tmp_path))
            wait_for(lambda: (tmp_path / "pid").exists(), "job started")
            worker = int((tmp_path / "pid").read_text())
            cluster.cancel(job)  # SIGINT now, SIGKILL of its group after the grace
            wait_for(lambda: (tmp_path / "interrupted").exists(), "job interrupted")
            interrupted = time.monotonic()
            namespace.ask("stop")
            namespace.ask(f"kill-worker {worker}")
            pid, child = map(int, namespace.ask(f"reuse {worker}").split())
            # The kill falls due while the node is paused: it runs as the node
            # resumes, along with the news of the worker's death.
            time.sleep(max(0.0, interrupted + CANCEL_GRACE - time.monotonic()))
            namespace.ask("cont")
            wait_for(job.done, "job settled")
            alive = namespace.ask("alive").split()
        log = (tmp_path / "node" / "node.log").read_text(errors="replace")
    finally:
        namespace.close()
    measure(
        f"pid {pid} (group leader) alive: {alive[0] == '1'}, its child "
        f"{child}: {alive[1] == '1'}; job {job.status.name}"
    )
    assert job.status == DispyJob.Terminated
    assert alive == ["1", "1"], "the node killed the process that reused its pid"
    assert f"worker {worker} had exited: not signalled by its pid" in log
