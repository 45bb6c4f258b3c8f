"""`nodeserver.containment`: leftovers of a job, and pids cgroups (in process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from nodeserver.containment import (
    descendants,
    end_leftovers,
    find_pids_root,
    sweep_stale_cgroups,
)
from tests.nodeproc import node_env


def test_end_leftovers_with_no_child_is_a_no_op():
    assert end_leftovers() == 0


def test_end_leftovers_kills_children_and_grandchildren():
    # A child in its own process (we must not make the test process a subreaper).
    code = (
        "import os, sys, time\n"
        "from nodeserver.containment import become_group_leader, descendants,"
        " end_leftovers\n"
        "become_group_leader()\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        if os.fork() == 0:\n"  # a grandchild, orphaned at once
        "            time.sleep(60)\n"
        "        os._exit(0)\n"
        "time.sleep(0.2)\n"
        "print(len(descendants(os.getpid())), end_leftovers(),"
        " len(descendants(os.getpid())))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env=node_env(),
    )
    assert out.returncode == 0, out.stderr
    before, killed, after = map(int, out.stdout.split())
    # 3 children (exited, not reaped) and 3 grandchildren, orphaned: they came
    # back to the subreaper rather than to init.
    assert before == 6
    assert killed == 6 and after == 0


def test_descendants_of_a_process_without_children_is_empty():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert descendants(proc.pid) == []
        assert proc.pid in descendants(os.getpid())
    finally:
        proc.kill()
        proc.wait()


def test_stale_worker_cgroups_of_dead_computations_are_swept():
    root = find_pids_root()
    if root is None:
        pytest.skip("no pids cgroup can be created here")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(root, f"dispynb-{dead.pid}-w1")
    live = os.path.join(root, f"dispynb-{os.getpid()}-w1")
    os.mkdir(stale)
    os.mkdir(live)
    try:
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{dead.pid}") and time.monotonic() < deadline:
            time.sleep(0.01)  # its number could be reused meanwhile: then skip
        if os.path.exists(f"/proc/{dead.pid}"):
            pytest.skip("the dead process's number was reused")
        assert sweep_stale_cgroups(root) >= 1
        assert not os.path.exists(stale)
        assert os.path.exists(live)  # its computation process (us) is alive
    finally:
        for path in (stale, live):
            if os.path.exists(path):
                os.rmdir(path)
