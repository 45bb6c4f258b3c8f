"""`nodeserver.containment`: leftovers of a job, and pids cgroups (in process)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from nodeserver.containment import (
    HeldWorker,
    descendants,
    end_leftovers,
    find_pids_root,
    place_in_new_cgroup,
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


def test_a_process_ended_before_its_cgroup_move_is_no_warning(caplog):
    """A computation process that ends as it starts (%dispy local's probes close
    theirs at once) is gone when the node moves it into its cgroup: nothing to
    contain. The node warned 'no pids limit for this worker: [Errno 3] No such
    process', which a %dispy local node's stderr put into the notebook's cell."""
    root = find_pids_root()
    if root is None:
        pytest.skip("no pids cgroup can be created here")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    if os.path.exists(f"/proc/{dead.pid}"):
        pytest.skip("the dead process's number was reused")
    caplog.set_level(logging.DEBUG, logger="nodeserver.containment")
    assert place_in_new_cgroup(root, dead.pid, 4) is None
    assert not os.path.exists(os.path.join(root, f"dispynb-{dead.pid}-first"))
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said == [
        (logging.DEBUG, "no pids limit for this worker: [Errno 3] No such process")
    ], said


#: A worker as its computation process forks one: it leads its own group and adopts
#: orphans, with a child in the group and an orphan that left it (setsid); prints
#: the three pids.
_WORKER = (
    "import os, sys, time\n"
    "from nodeserver.containment import become_group_leader\n"
    "become_group_leader()\n"
    "child = os.fork()\n"
    "if child == 0:\n"
    "    time.sleep(60)\n"
    "    os._exit(0)\n"
    "read, write = os.pipe()\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        os.write(write, b'%d' % os.getpid())\n"
    "        time.sleep(60)\n"
    "    os._exit(0)\n"
    "away = int(os.read(read, 32))\n"
    "print(os.getpid(), child, away, flush=True)\n"
    "time.sleep(60)\n"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("kernel", ["group-flag", "no-group-flag", "no-pidfd"])
def test_a_held_worker_is_killed_with_its_group_and_descendants(kernel, monkeypatch):
    """`HeldWorker.kill_tree` on each kernel it meets: with
    PIDFD_SIGNAL_PROCESS_GROUP (Linux 6.9+), without it (EINVAL: by the group's
    number, checked just before) and without pidfds (before 5.3: by pid)."""
    if kernel == "no-group-flag":
        real = signal.pidfd_send_signal

        def old_kernel(fd: int, sig: int, siginfo: object = None, flags: int = 0):
            if flags:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real(fd, sig)

        monkeypatch.setattr(signal, "pidfd_send_signal", old_kernel)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER],
        stdout=subprocess.PIPE,
        text=True,
        env=node_env(),
    )
    try:
        assert proc.stdout is not None
        worker, child, away = map(int, proc.stdout.readline().split())
        held = HeldWorker(
            worker, None if kernel == "no-pidfd" else os.pidfd_open(worker)
        )
        try:
            assert not held.exited()
            assert held.kill_tree()
            proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while (_alive(child) or _alive(away)) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert (_alive(child), _alive(away)) == (False, False)
            if kernel != "no-pidfd":
                assert held.exited()
                assert not held.kill_tree()  # exited: nothing signalled by pid
        finally:
            held.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
