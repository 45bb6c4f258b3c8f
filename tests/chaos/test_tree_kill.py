"""A node's whole process tree killed at once, as a batch system kills a job's
cgroup, mid-job; then the node started again with the same port and directory.

The node server, its computation process and its workers die together, so no
process of the node can report anything. The client must end the jobs it held
``Abandoned``, naming the node and why, and use the node again once it is back.
The node runs in a cgroup v2 directory of its own if the machine lets the test make
one (``cgroup.kill``); otherwise every process of its tree gets SIGKILL at once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dispynb import JobCluster
from tests.chaos.outcomes import alive, assert_abandoned
from tests.jobs import wait_until
from tests.nodeproc import CliNode, start_node

pytestmark = pytest.mark.slow

#: Where a cgroup v2 hierarchy may be mounted.
CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


def mark_and_hold(n: int, marks: str, seconds: float) -> int:
    """Write ``marks/n``, then run for ``seconds``."""
    import os
    import time

    open(os.path.join(marks, str(n)), "w").close()
    time.sleep(seconds)
    return n * n


def make_cgroup() -> Path | None:
    """A fresh cgroup v2 directory with ``cgroup.kill``, or None if none can be
    made here."""
    for root in CGROUP_ROOTS:
        if not (root / "cgroup.controllers").exists():  # not cgroup v2
            continue
        group = root / f"dispynb-chaos-{secrets.token_hex(4)}"
        with contextlib.suppress(OSError):
            group.mkdir()
            if (group / "cgroup.kill").exists():  # Linux 5.14 or later
                return group
            group.rmdir()
    return None


@contextlib.contextmanager
def own_cgroup() -> Iterator[Path | None]:
    """`make_cgroup`, removed at the end (after killing what is left in it)."""
    group = make_cgroup()
    try:
        yield group
    finally:
        if group is not None:
            with contextlib.suppress(OSError):
                (group / "cgroup.kill").write_text("1")
            procs = group / "cgroup.procs"
            wait_until(lambda: not procs.read_text().split())
            group.rmdir()


def cgroup_launcher(group: Path | None) -> list[str]:
    """A `start_node` launcher putting the node in ``group`` (none: no launcher)."""
    if group is None:
        return []
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]


def kill_tree(node: CliNode, group: Path | None) -> None:
    """SIGKILL the node and all its processes together."""
    kill_all(node.proc.pid, group)
    node.proc.wait(20)


def kill_all(pid: int, group: Path | None) -> None:
    """SIGKILL the process ``pid`` and all its descendants together: the whole
    cgroup ``group`` (it in it) if there is one, as a batch system does."""
    if group is not None:
        (group / "cgroup.kill").write_text("1")
    else:
        root = psutil.Process(pid)
        for process in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)


@pytest.mark.timeout(90)
def test_a_node_killed_whole_ends_its_jobs_abandoned_and_serves_again_restarted(
    tmp_path: Path,
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    with own_cgroup() as group:
        launcher = cgroup_launcher(group)
        victim = start_node(tmp_path / "victim", cpus=2, launcher=launcher)
        pids = {victim.proc.pid}
        try:
            with JobCluster(
                mark_and_hold,
                nodes=[victim.spec],
                secret=victim.secret,
                pulse_interval=0.3,
            ) as cluster:
                # (30 s: the node is killed long before)
                jobs = [cluster.submit(n, str(marks), 30) for n in range(2)]
                wait_until(lambda: len(os.listdir(marks)) == 2, timeout=30)
                pids |= {p.pid for p in psutil.Process(victim.proc.pid).children(True)}
                kill_tree(victim, group)
                assert cluster.wait(timeout=30)
                assert_abandoned(jobs, f"node {victim.spec} was lost (")
                wait_until(lambda: not [pid for pid in pids if alive(pid)])
                # Started again as an operator would: same port, same directory.
                back = start_node(
                    tmp_path / "victim", "--port", str(victim.port), cpus=2
                )
                try:
                    assert back.port == victim.port
                    assert cluster.submit(3, str(marks), 0)() == 9
                finally:
                    back.stop()
        finally:
            if victim.proc.poll() is None:
                victim.stop()
