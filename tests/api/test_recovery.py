"""Client crash recovery: kill -9 a client mid-run, recover its jobs elsewhere."""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys

import pytest

import dispynb
from dispynb.errors import ConfigurationError
from tests.jobs import WAIT, wait_until
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

CLIENT = """
import sys, time
import dispynb as dispy

def compute(n, marks, all_slow):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()  # the node has the job
    # Odd ones end after the client is killed; with all_slow every job is long, so
    # the client keeps few jobs in flight (short jobs widen its pipeline).
    time.sleep(1.0 if n % 2 or all_slow else 0.0)
    return n * n

cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]], secret=sys.argv[2],
                           recover_file=sys.argv[3])
all_slow = sys.argv[5] == "slow"
jobs = [cluster.submit_job_id("job-%d" % n, n, sys.argv[4], all_slow)
        for n in range(20)]
print("submitted", flush=True)
time.sleep(60)  # killed before it gets further
"""

RECOVER = """
import json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(sys.argv[1], timeout=30, secret=sys.argv[2])
print(json.dumps([[j.id, j._args[0], int(j.status), j.result, j.exception]
                  for j in jobs]))
"""

# recover_jobs from a notebook cell: the kernel's event loop is running in this thread.
RECOVER_IN_CELL = """
import asyncio, json, sys
import dispynb as dispy

async def cell():
    return dispy.recover_jobs(sys.argv[1], timeout=30, secret=sys.argv[2])

jobs = asyncio.run(cell())
print(json.dumps([[j.id, j._args[0], int(j.status), j.result, j.exception]
                  for j in jobs]))
"""


def run_and_kill_client(
    tmp_path, node, started: int, all_slow: bool = False, recover: str = RECOVER
) -> list[list[object]]:
    """Run CLIENT until ``started`` jobs run on the node, SIGKILL it, then recover
    in a new process."""
    journal = tmp_path / "journal.db"
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "client.py").write_text(CLIENT)
    (tmp_path / "recover.py").write_text(recover)
    client = subprocess.Popen(
        [
            sys.executable,
            "client.py",
            node.spec,
            node.secret,
            str(journal),
            str(marks),
            "slow" if all_slow else "mixed",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "submitted"
        wait_until(lambda: len(list(marks.iterdir())) >= started)
        client.send_signal(signal.SIGKILL)
        client.wait(WAIT)
    finally:
        client.kill()
        client.stdout.close()  # type: ignore[union-attr]
    done = subprocess.run(
        [sys.executable, "recover.py", str(journal), node.secret],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert node.secret not in journal.read_bytes().decode("latin-1")  # never kept
    return json.loads(done.stdout)


def test_recover_jobs_after_client_sigkill_returns_every_job_once(tmp_path):
    """20 jobs running on a node when the client dies; half end while it is dead."""
    with running_node(tmp_path / "node", cpus=20) as node:
        jobs = run_and_kill_client(tmp_path, node, started=20)
    assert [job[0] for job in jobs] == [f"job-{n}" for n in range(20)]
    assert [job[1] for job in jobs] == list(range(20))
    assert all(job[2] == 11 for job in jobs), jobs
    assert [job[3] for job in jobs] == [n * n for n in range(20)]


def test_recover_jobs_from_a_running_loop_as_in_a_notebook_cell(tmp_path):
    """recover_jobs runs on dispynb's one I/O loop, so a caller's running loop (a
    notebook cell's) does not stop it (asyncio.run would refuse to start)."""
    with running_node(tmp_path / "node", cpus=20) as node:
        jobs = run_and_kill_client(tmp_path, node, started=20, recover=RECOVER_IN_CELL)
    assert [job[0] for job in jobs] == [f"job-{n}" for n in range(20)]
    assert all(job[2] == 11 for job in jobs), jobs
    assert [job[3] for job in jobs] == [n * n for n in range(20)]


def test_recover_jobs_never_sent_jobs_come_back_abandoned_with_arguments(tmp_path):
    """With 1 CPU, most jobs never reached the node: they come back Abandoned."""
    with running_node(tmp_path / "node", cpus=1) as node:
        jobs = run_and_kill_client(tmp_path, node, started=1, all_slow=True)
    assert [job[1] for job in jobs] == list(range(20))
    finished = [job for job in jobs if job[2] == 11]
    abandoned = [job for job in jobs if job[2] == 10]
    assert len(finished) + len(abandoned) == 20
    assert finished and abandoned
    assert all(job[3] == job[1] ** 2 for job in finished)
    assert all(
        "not yet sent" in job[4] or "never reached" in job[4] for job in abandoned
    )


def test_recover_file_removed_after_clean_close(local, tmp_path):
    journal = tmp_path / "journal.db"
    with dispynb.JobCluster(abs, nodes=local, recover_file=str(journal)) as cluster:
        assert cluster.submit(-2)() == 2
        assert journal.exists()
    assert not journal.exists()


def test_recover_jobs_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        dispynb.recover_jobs(str(tmp_path / "none.db"))


# -- dispy's default recovery file (_dispy_<timestamp>) and recover_jobs() ------------

DEFAULT_CLIENT = """
import sys, time
import dispynb as dispy

def compute(n, marks):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()  # the node has the job
    deadline = time.monotonic() + 30
    while n % 2 and time.monotonic() < deadline:  # odd ones end once it is killed
        if os.path.exists(os.path.join(marks, "release")):
            break
        time.sleep(0.01)
    return n * n

cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]], secret=sys.argv[2])
for job in [cluster.submit(n, sys.argv[3]) for n in range(0, 10, 2)]:
    job()
odd = [cluster.submit(n, sys.argv[3]) for n in range(1, 10, 2)]
print("even ones done", flush=True)
time.sleep(60)  # killed before it gets further
"""

DEFAULT_RECOVER = """
import json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(timeout=30, secret=sys.argv[1])  # dispy's call: no file
print(json.dumps([[j.id, int(j.status), j.result] for j in jobs]))
"""


def default_files(directory, sidecars: bool = False) -> list:
    """The default recovery files in ``directory`` (and SQLite's -wal/-shm)."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.name.startswith("_dispy_")
        and (sidecars or not p.name.endswith(("-wal", "-shm")))
    )


def test_recover_jobs_without_arguments_finds_the_default_file(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "client.py").write_text(DEFAULT_CLIENT)
    (tmp_path / "recover.py").write_text(DEFAULT_RECOVER)
    with running_node(tmp_path / "node", cpus=10) as node:
        client = subprocess.Popen(
            [sys.executable, "client.py", node.spec, node.secret, str(marks)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "even ones done"
            wait_until(lambda: len(list(marks.iterdir())) == 10)  # all started
            [recover_file] = default_files(tmp_path)  # written as dispy's is
            assert re.fullmatch(r"_dispy_\d{14}_\d+", recover_file.name)
            assert stat.S_IMODE(recover_file.stat().st_mode) == 0o600
            client.send_signal(signal.SIGKILL)
            client.wait(WAIT)
        finally:
            client.kill()
            client.stdout.close()  # type: ignore[union-attr]
        # The jobs end once the node knows the client is gone (they would reach its
        # dead connection otherwise: lost with it, as in dispy).
        wait_until(lambda: "client of computation compute gone" in node.log_text())
        (marks / "release").touch()
        assert node.secret not in recover_file.read_bytes().decode("latin-1")
        done = subprocess.run(
            [sys.executable, "recover.py", node.secret],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout)
    # The jobs that ended after the client died, as the node kept them (no ids,
    # as in dispy); the ones the client had received are not sent twice.
    assert sorted(job[2] for job in jobs) == [n * n for n in range(1, 10, 2)]
    assert all(job[0] is None and job[1] == 11 for job in jobs)
    assert default_files(tmp_path, sidecars=True) == []  # all collected: removed


def test_default_recovery_file_removed_after_clean_close(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with running_node(tmp_path / "node") as node:
        c1 = dispynb.JobCluster(abs, nodes=[node.spec], secret=node.secret)
        c2 = dispynb.JobCluster(abs, nodes=[node.spec], secret=node.secret)
        assert c1.submit(-2)() == 2 and c2.submit(-3)() == 3
        [shared] = default_files(tmp_path)  # one per process, as dispy's
        c2.close()
        assert default_files(tmp_path) == [shared]  # c1 still uses it
        c1.close()
    assert default_files(tmp_path, sidecars=True) == []


def test_recover_file_false_writes_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with (
        running_node(tmp_path / "node") as node,
        dispynb.JobCluster(
            abs, nodes=[node.spec], secret=node.secret, recover_file=False
        ) as cluster,
    ):
        assert cluster.submit(-4)() == 4
        assert default_files(tmp_path, sidecars=True) == []


def test_local_cluster_writes_no_recovery_file(local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with dispynb.JobCluster(abs, nodes=local) as cluster:
        assert cluster.submit(-1)() == 1
        assert default_files(tmp_path) == []


def test_recover_jobs_without_arguments_and_no_file_returns_nothing(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    assert dispynb.recover_jobs() == []
    assert "no recovery file (_dispy_*)" in caplog.text


EXITING = """
import os, sys, time
import dispynb as dispy

def compute(marker):
    import time
    open(marker, "w").close()
    time.sleep(60)

cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]], secret=sys.argv[2])
job = cluster.submit(sys.argv[3])
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
print("exiting without close()", flush=True)
"""


def test_cluster_left_open_is_closed_at_exit(tmp_path):
    """A script that ends without close(): its running job is terminated, the node
    released and the default recovery file removed, as at a clean close."""
    (tmp_path / "client.py").write_text(EXITING)
    with running_node(tmp_path / "node") as node:
        done = subprocess.run(
            [
                sys.executable,
                "client.py",
                node.spec,
                node.secret,
                str(tmp_path / "started"),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "exiting without close()\n"
        wait_until(lambda: "disconnected" in node.log_text())
        assert "results kept" not in node.log_text()  # closed, not kept
    assert default_files(tmp_path, sidecars=True) == []


# -- a result large enough to be streamed in chunks ----------------------------------

#: A job returning bytes just over the node's streaming threshold (STREAM_BYTES of
#: pickled result travel in ResultChunk messages), checksummed by the job itself.
BIG_CLIENT = """
import sys, time
import dispynb as dispy

def big(marks, size):
    import hashlib, os, time
    data = os.urandom(size)
    with open(os.path.join(marks, hashlib.sha256(data).hexdigest()), "w"):
        pass
    time.sleep(0.5)
    return data

cluster = dispy.JobCluster(big, nodes=[sys.argv[1]], secret=sys.argv[2],
                           recover_file=sys.argv[3])
job = cluster.submit_job_id("big", sys.argv[4], int(sys.argv[5]))
print("submitted", flush=True)
time.sleep(60)  # killed before it gets further
"""

RECOVER_BIG = """
import hashlib, json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(sys.argv[1], timeout=30, secret=sys.argv[2])
print(json.dumps([[j.id, int(j.status), len(j.result or b""),
                   hashlib.sha256(j.result or b"").hexdigest(), j.exception]
                  for j in jobs]))
"""


def test_recover_jobs_gets_a_streamed_result_whole(tmp_path):
    """A result over the streaming threshold, of a job that ends after its client
    was SIGKILLed, is recovered whole."""
    from nodeserver.computation import STREAM_BYTES

    size = STREAM_BYTES + 4096  # the smallest that streams, and a little
    journal = tmp_path / "journal.db"
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "client.py").write_text(BIG_CLIENT)
    (tmp_path / "recover.py").write_text(RECOVER_BIG)
    with running_node(tmp_path / "node", cpus=1) as node:
        client = subprocess.Popen(
            [sys.executable, "client.py", node.spec, node.secret, str(journal),
             str(marks), str(size)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "submitted"
            wait_until(lambda: any(marks.iterdir()))
            client.send_signal(signal.SIGKILL)
            client.wait(WAIT)
        finally:
            client.kill()
            client.stdout.close()  # type: ignore[union-attr]
        done = subprocess.run(
            [sys.executable, "recover.py", str(journal), node.secret],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    (digest,) = [mark.name for mark in marks.iterdir()]
    assert json.loads(done.stdout) == [["big", 11, size, digest, None]]
