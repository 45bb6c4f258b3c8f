"""A node killed whole (as a batch system kills its cgroup) after a worker wrote a
job's large result into shared memory, before anyone read it.

A result of at least a MiB for a client on the node's machine goes through
``/dev/shm`` (`dispynb.protocol.shm.write_result`): the client unlinks it as it
reads it, the node as it closes the computation. With both the node and its
computation killed, nobody did: the object (the result's size, in RAM) stayed until
the machine rebooted, one more at every such kill. The node started again on the
same directory removes what the killed one left, its result objects too. A real
node from the command line in a cgroup of its own where the machine allows.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from dispynb import JobCluster
from dispynb.protocol import shm
from tests.chaos.outcomes import alive, assert_abandoned
from tests.chaos.test_tree_kill import cgroup_launcher, kill_tree, own_cgroup
from tests.jobs import wait_until
from tests.nodeproc import start_node

pytestmark = pytest.mark.slow

MiB = 1 << 20


def wait_then_double(marks: str, go: str, data: bytes) -> bytes:
    """Write ``marks/started``, wait for ``go`` (30 s at most); ``data`` twice."""
    import os
    import time

    open(os.path.join(marks, "started"), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return data + data


def results_in_memory() -> dict[str, int]:
    """The result objects in /dev/shm now, with their sizes."""
    found = {}
    for path in shm.SHM_DIR.glob("dnr-*"):
        try:
            found[path.name] = path.stat().st_size
        except FileNotFoundError:
            continue
    return found


@pytest.mark.timeout(90)
def test_a_result_in_shared_memory_is_freed_when_its_killed_node_starts_again(
    tmp_path: Path,
) -> None:
    """The node server is stopped before the job returns, so that its result (4
    MiB) is written but reaches nobody; then the node and all its processes are
    killed together."""
    marks, go = tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    before = set(results_in_memory())
    written: set[str] = set()
    with own_cgroup() as group:
        launcher = cgroup_launcher(group)
        node = start_node(tmp_path / "node", cpus=1, launcher=launcher)
        try:
            with JobCluster(
                wait_then_double,
                nodes=[node.spec],
                secret=node.secret,
                pulse_interval=0.3,
            ) as cluster:
                data = os.urandom(2 * MiB)  # through shared memory, both ways
                job = cluster.submit(str(marks), str(go), data)
                wait_until(lambda: (marks / "started").exists(), timeout=30)
                server = psutil.Process(node.proc.pid)
                pids = {server.pid} | {p.pid for p in server.children(True)}
                server.suspend()  # the result is reported to nobody
                go.touch()

                def written_whole() -> bool:
                    new = {n: s for n, s in results_in_memory().items()
                           if n not in before}  # fmt: skip
                    written.update(new)
                    return any(size >= 4 * MiB for size in new.values())

                wait_until(written_whole, timeout=30)
                kill_tree(node, group)
                assert cluster.wait(timeout=30)
                assert_abandoned([job], f"node {node.spec} was lost (")
                wait_until(lambda: not [pid for pid in pids if alive(pid)])
            # Nobody is left to unlink it.
            assert written <= set(results_in_memory())
            back = start_node(tmp_path / "node", cpus=1)
            try:
                wait_until(lambda: not written & set(results_in_memory()))
                said = "removed 1 job result in shared memory (/dev/shm) that a node"
                wait_until(lambda: said in back.log_text())
            finally:
                back.stop()
        finally:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
            for name in written:
                shm.unlink(name)
