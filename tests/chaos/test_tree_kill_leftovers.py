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
