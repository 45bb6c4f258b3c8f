"""A node whose disk fills up, or whose directory is removed, while it serves.

Real node processes started from the command line; the full disk is a small tmpfs
mounted in a mount namespace of the node's own (`unshare -m`), filled from outside
through ``/proc/<pid>/root``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import SetupError
from tests.jobs import WAIT, wait_until
from tests.nodeproc import CliNode, running_node, start_node

pytestmark = pytest.mark.slow


def wait_for_go(n: int, go: str) -> int:
    import os
    import time

    deadline = time.monotonic() + 30
    while n == 0 and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n


def test_a_node_whose_directory_is_removed_under_running_jobs_serves_on(tmp_path):
    """A /tmp cleaner (or an operator) removes the node's --dest-path while a job
    runs: the next jobs run (their directory made again), and a new cluster with a
    file to send sets up there. Before, every later job killed its worker ('exited
    with status 1') and the new cluster's file put broke its connection."""
    data = tmp_path / "data.txt"
    data.write_text("x")
    go = tmp_path / "go"
    with running_node(tmp_path / "node", cpus=2) as node:
        with JobCluster(
            wait_for_go, nodes=[node.spec], secret=node.secret, depends=[str(data)]
        ) as cluster:
            first = cluster.submit(0, str(go))
            wait_until(lambda: first.status == DispyJob.Running)
            # Until it is gone: the node may write in it meanwhile ('Directory
            # not empty' once), as a cleaner meets it and tries again.
            wait_until(lambda: _removed(tmp_path / "node" / "dest"))
            go.touch()
            assert first() == 0
            later = [cluster.submit(n, str(go)) for n in range(1, 7)]
            assert cluster.wait(timeout=WAIT)
            assert [job.exception for job in later] == [None] * 6
            assert [job() for job in later] == [n * n for n in range(1, 7)]
        with JobCluster(
            wait_for_go, nodes=[node.spec], secret=node.secret, depends=[str(data)]
        ) as again:
            assert again.submit(3, str(go))() == 9
    assert "Traceback" not in node.log_text()


def _removed(path: Path) -> bool:
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


def tmpfs_node(
    directory: Path, size: str, *args: str, cpus: int = 1, tmpdir: bool = False
) -> CliNode:
    """A node whose --dest-path is a tmpfs of ``size`` of its own (``args``: more
    options); with ``tmpdir``, its TMPDIR too (``tmp`` in it)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs in a mount namespace needs root and unshare")
    dest = directory / "dest"
    dest.mkdir(parents=True)
    mount = f'mount -t tmpfs -o size={size},mode=0700 tmpfs "{dest}"'
    if tmpdir:
        mount += f' && mkdir "{dest}/tmp"'
    launcher = [
        *(["env", f"TMPDIR={dest}/tmp"] if tmpdir else []),
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        f'{mount} && exec "$@"', "sh",
    ]  # fmt: skip
    return start_node(directory, *args, cpus=cpus, launcher=launcher)


def fill(node: CliNode, directory: Path) -> None:
    """Fill the node's tmpfs (seen through its mount namespace) to the last byte."""
    filler = Path(f"/proc/{node.proc.pid}/root{directory / 'dest' / 'filler'}")
    # Unbuffered: nothing is left to flush (and fail) at close.
    with (
        open(filler, "wb", buffering=0) as handle,
        pytest.raises(OSError, match="No space left"),
    ):
        while True:
            handle.write(b"\0" * 65536)


def square(n: int) -> int:
    return n * n


def test_a_file_the_full_disk_cannot_hold_fails_the_setup_saying_so(tmp_path):
    """Before, the node broke the client's connection with a traceback in its log
    (and with that fixed alone, the setup waited for the file for ever)."""
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(256 * 1024))
    node = tmpfs_node(tmp_path / "node", "1M")
    try:
        fill(node, tmp_path / "node")
        with pytest.raises(SetupError, match="No space left on device"):
            JobCluster(
                square, nodes=[node.spec], secret=node.secret, depends=[str(data)]
            )
        with JobCluster(square, nodes=[node.spec], secret=node.secret) as cluster:
            assert cluster.submit(4)() == 16  # and it serves on
    finally:
        node.stop()
    assert "Traceback" not in node.log_text()


CLIENT = """
import sys, time
import dispynb as dispy

def compute(n, go):
    import os, time
    open(go + "-started-%d" % n, "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return bytes([n]) * 600_000  # one fits in the node's 1 MiB in memory, not two

cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]], secret=sys.argv[2],
                           recover_file=sys.argv[3])
jobs = [cluster.submit(n, sys.argv[4]) for n in range(2)]
print("submitted", flush=True)
time.sleep(60)  # killed before it gets further
"""

RECOVER = """
import json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(sys.argv[1], timeout=30, secret=sys.argv[2])
print(json.dumps([[int(j.status), j.exception, j.result and len(set(j.result))]
                  for j in jobs]))
"""


def test_results_a_full_disk_refuses_are_kept_in_memory_the_rest_lost_saying_why(
    tmp_path,
):
    """The client is killed, its jobs end on a node whose disk is full: the node
    keeps their results in memory, within its --kept-results-size (before, it
    dropped them all); recovery says the node could not keep the one over that
    (before: 'the job never reached node ...: it did not run', and the node's log
    had a traceback from the session's end, whose computation was then never
    closed)."""
    (tmp_path / "client.py").write_text(CLIENT)
    (tmp_path / "recover.py").write_text(RECOVER)
    journal, go = tmp_path / "journal.db", tmp_path / "go"
    # At debug level: a result not spooled after the first is a line there.
    node = tmpfs_node(
        tmp_path / "node", "1M", "--loglevel", "debug", "--kept-results-size", "1M",
        cpus=2,
    )  # fmt: skip
    try:
        client = subprocess.Popen(
            [sys.executable, "client.py", node.spec, node.secret, str(journal),
             str(go)],
            cwd=tmp_path, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "submitted"
            wait_until(lambda: len(list(tmp_path.glob("go-started-*"))) == 2)
            fill(node, tmp_path / "node")
            client.kill()
            client.wait(WAIT)
        finally:
            client.kill()
            client.stdout.close()  # type: ignore[union-attr]
        wait_until(lambda: "client of computation compute gone" in node.log_text())
        go.touch()
        wait_until(lambda: node.log_text().count("cannot spool a kept result") == 2)
        done = subprocess.run(
            [sys.executable, "recover.py", str(journal), node.secret],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        node.stop()
    assert done.returncode == 0, done.stderr
    kept, lost = sorted(json.loads(done.stdout), key=lambda job: job[0], reverse=True)
    assert kept[0] == DispyJob.Finished and kept[2] == 1, kept  # its 600 kB whole
    assert lost[0] == DispyJob.Abandoned, lost
    assert "could not keep its result" in lost[1], lost
    assert "Traceback" not in node.log_text()


def test_a_full_disk_makes_room_from_the_cached_files_nobody_uses(tmp_path):
    """Files of closed clusters stay cached on the node (up to --file-cache-size,
    1G by default); on a disk smaller than that, a new cluster's file that finds it
    full takes their room, idle longest first, instead of failing the setup 'No
    space left on device'. Both ways a node stores a file: in a thread (1 MiB and
    more) and on its loop."""
    MiB = 1 << 20
    files = {}
    for name, size in [("a1", 1.5), ("a2", 1.5), ("b", 1.5), ("c1", 0.9), ("c2", 0.5)]:
        files[name] = tmp_path / f"{name}.bin"
        files[name].write_bytes(os.urandom(int(size * MiB)))
    node = tmpfs_node(tmp_path / "node", "4M")
    store = Path(f"/proc/{node.proc.pid}/root{tmp_path / 'node' / 'dest' / '.store'}")
    try:
        for names in [("a1", "a2"), ("b",), ("c1", "c2")]:
            with JobCluster(
                square,
                nodes=[node.spec],
                secret=node.secret,
                depends=[str(files[name]) for name in names],
            ) as cluster:
                assert cluster.submit(3)() == 9
        kept = sorted(
            entry.stat().st_size
            for entry in store.iterdir()
            if not entry.name.startswith(".")  # the store's own (.boot)
        )
    finally:
        node.stop()
    log = node.log_text()
    assert "Traceback" not in log
    assert log.count("disk full: removed") == 2, log  # b (in a thread), c2 (loop)
    # The newest files are cached; the oldest made room.
    assert sum(kept) <= 4 * MiB
    assert int(0.5 * MiB) in kept and int(0.9 * MiB) in kept
