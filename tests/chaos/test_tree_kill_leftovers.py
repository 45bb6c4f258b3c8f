"""A client and its LocalCluster's nodes killed together (SIGKILL to a batch job's
whole cgroup) mid-job: none of them can remove the LocalCluster's directory in the
temporary directory, with the nodes' copies of the jobs' ``depends`` files. The next
LocalCluster started must remove it, and never the directory of one still running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from dispynb import LocalCluster
from tests.chaos.outcomes import alive
from tests.chaos.test_killed_node_results import remove, results_in_memory
from tests.chaos.test_tree_kill import cgroup_launcher, kill_all, own_cgroup
from tests.jobs import wait_until

pytestmark = pytest.mark.slow

#: The killed client: a LocalCluster of one node of two CPUs, two jobs holding a
#: ``depends`` file, and its directory printed once both jobs run.
CLIENT = """\
import os, sys, time
from dispynb import JobCluster, LocalCluster

def hold(n, marks):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()
    time.sleep(60)

marks, data = sys.argv[1:]
local = LocalCluster(cpus=2)
cluster = JobCluster(hold, nodes=local, depends=[data])
jobs = [cluster.submit(n, marks) for n in range(2)]
while len(os.listdir(marks)) < 2:
    time.sleep(0.01)
print(local._dir, flush=True)
time.sleep(60)
"""


def copies(directory: Path, name: str) -> list[Path]:
    """The files called ``name`` anywhere under ``directory``."""
    return [Path(root) / name for root, _, files in os.walk(directory) if name in files]


@pytest.mark.timeout(120)
def test_the_next_local_cluster_removes_the_directory_of_a_tree_killed_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"  # this test's TMPDIR: no other user's directories
    temp.mkdir()
    marks = tmp_path / "marks"
    marks.mkdir()
    data = tmp_path / "depends-data.bin"
    data.write_bytes(b"x" * 4096)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": root}
    with own_cgroup() as group:
        client = subprocess.Popen(
            [
                *cgroup_launcher(group),
                sys.executable,
                "-c",
                CLIENT,
                str(marks),
                str(data),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert client.stdout is not None
            left = Path(client.stdout.readline().strip())
            pids = {client.pid}
            pids |= {p.pid for p in psutil.Process(client.pid).children(recursive=True)}
            assert copies(left, data.name)  # the node's copy
            kill_all(client.pid, group)
            client.wait(20)
            wait_until(lambda: not [pid for pid in pids if alive(pid)])
        finally:
            if client.poll() is None:
                kill_all(client.pid, group)
                client.wait(20)
            if client.stdout is not None:
                client.stdout.close()
    assert copies(left, data.name), "left behind, as a killed tree leaves it"

    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with LocalCluster(cpus=1) as first:
        assert not left.exists()
        assert Path(first._dir).is_dir()
        with LocalCluster(cpus=1):  # its owner runs: kept
            assert Path(first._dir).is_dir()
        assert Path(first._dir).is_dir()


#: The killed client of a job's result in shared memory: a LocalCluster of one
#: node, a job whose arguments (2 MiB) and so its result (4 MiB) go through
#: /dev/shm, waiting for ``GO``; ``MARKS/started`` holds its objects' prefix.
RESULT_CLIENT = """\
import sys
from dispynb import JobCluster, LocalCluster
from tests.chaos.test_killed_node_results import wait_then_double

marks, go = sys.argv[1:]
local = LocalCluster(cpus=1)
cluster = JobCluster(wait_then_double, nodes=local)
job = cluster.submit(marks, go, bytes(2 << 20))
print(job(), flush=True)
"""


@pytest.mark.timeout(120)
def test_the_next_local_cluster_frees_the_results_of_a_tree_killed_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client is stopped (a kernel busy elsewhere), its job's result written to
    /dev/shm and passed on to it, and the client and its node killed together.
    Nobody was left to unlink the result: the next LocalCluster removed the
    killed one's directory, but the result stayed in RAM until the machine
    rebooted. Now it goes with the directory it was named after."""
    temp = tmp_path / "tmp"  # this test's TMPDIR: no other user's directories
    temp.mkdir()
    marks, go = tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": root}
    written: set[str] = set()
    with own_cgroup() as group:
        client = subprocess.Popen(
            [
                *cgroup_launcher(group),
                sys.executable,
                "-c",
                RESULT_CLIENT,
                str(marks),
                str(go),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_until(lambda: (marks / "started").exists(), timeout=60)
            prefix = (marks / "started").read_text()
            pids = {client.pid}
            pids |= {p.pid for p in psutil.Process(client.pid).children(recursive=True)}
            psutil.Process(client.pid).suspend()  # it reads nothing from now on
            go.touch()

            def written_whole() -> bool:
                new = results_in_memory(prefix)
                written.update(new)
                return any(size >= 4 << 20 for size in new.values())

            wait_until(written_whole, timeout=30)
            kill_all(client.pid, group)
            client.wait(20)
            wait_until(lambda: not [pid for pid in pids if alive(pid)])
        finally:
            if client.poll() is None:
                kill_all(client.pid, group)
                client.wait(20)
    try:
        assert results_in_memory(prefix), "left behind, as a killed tree leaves it"
        monkeypatch.setenv("TMPDIR", str(temp))
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        with LocalCluster(cpus=1):
            assert not results_in_memory(prefix)
    finally:
        remove(written | set(results_in_memory(prefix)))
