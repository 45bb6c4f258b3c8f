"""Files and provisional results that jobs send once their client was killed
(``kill -9``) are kept by the node, and `recover_jobs` in a new process gets them:
the files saved under its ``files_dir``, a job still running showing its latest
provisional result, as the crashed cluster's job would. The jobs learned that the
client did not write their files. A real node process; real client processes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb.job import JobStatus
from tests.api.crashclient import killed_after, start_client
from tests.jobs import wait_until
from tests.logged import LOG_LINE
from tests.nodeproc import CliNode, node_env, running_node

pytestmark = pytest.mark.slow

#: Two jobs that start, wait for ``go`` (made once their client is killed), send a
#: file and a provisional result, note what dispy_send_file returned and said;
#: job 1 then runs until ``release`` exists (also tests/sharedsched/test_kept_sent).
SENDING_JOB = """
def job(n, marks, go, release):
    import contextlib, io, os, time
    open(os.path.join(marks, "started-%d" % n), "w").close()
    while not os.path.exists(go):
        time.sleep(0.02)
    with open("out-%d.txt" % n, "w") as handle:
        handle.write("file of job %d" % n)
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        sent = dispy_send_file("out-%d.txt" % n)
    dispy_provisional_result("half of %d" % n)
    # Written whole, then renamed: the test reads it once it exists.
    mark = "sent-%d" % n
    with open(os.path.join(marks, "~" + mark), "w") as handle:
        handle.write("%d %s" % (sent, said.getvalue()))
    os.replace(os.path.join(marks, "~" + mark), os.path.join(marks, mark))
    while n == 1 and not os.path.exists(release):
        time.sleep(0.02)
    return n * 10
"""

#: A client of `SENDING_JOB` on a node, with a journal.
CLIENT = (
    """
import sys, time
import dispynb as dispy

"""
    + SENDING_JOB
    + """
node, secret, journal, marks, go, release = sys.argv[1:]
cluster = dispy.JobCluster(job, nodes=[node], secret=secret, recover_file=journal)
jobs = [cluster.submit(n, marks, go, release) for n in range(2)]
print("submitted", flush=True)
time.sleep(300)  # killed before it gets further
"""
)

#: Recovers, saving files under argv[3]; prints each job's status and result. Logs
#: at INFO, as a script that asked for dispynb's progress does.
RECOVER = """
import json, logging, sys
import dispynb as dispy
logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
)
jobs = dispy.recover_jobs(sys.argv[1], secret=sys.argv[2], files_dir=sys.argv[3],
                          timeout=float(sys.argv[4]))
print(json.dumps([[int(job.status), job.result] for job in jobs]))
"""


def _submitted(
    tmp_path: Path, script: str, node: CliNode, *args: str
) -> subprocess.Popen[str]:
    """Start client ``script`` (its node, secret and journal, then ``args``) in
    its own process, once it has submitted its jobs; write `RECOVER` beside it."""
    (tmp_path / "recover.py").write_text(RECOVER)
    journal = str(tmp_path / "journal.db")
    return start_client(
        tmp_path, script, node.spec, node.secret, journal, *args, env=node_env()
    )


def _recover(
    tmp_path: Path,
    secret: str,
    received: Path,
    timeout: float,
    said: list | None = None,
) -> list:
    """`RECOVER`'s jobs, as [status, result]; its log lines appended to ``said``."""
    proc = subprocess.run(
        [sys.executable, "recover.py", str(tmp_path / "journal.db"), secret,
         str(received), str(timeout)],
        cwd=tmp_path, env=node_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    if said is not None:
        said.extend(
            m[3] for m in map(LOG_LINE.fullmatch, proc.stderr.splitlines()) if m
        )
    return json.loads(proc.stdout.splitlines()[-1])


def test_files_and_provisional_results_sent_after_a_crash_are_recovered(
    tmp_path: Path,
) -> None:
    marks, received = tmp_path / "marks", tmp_path / "received"
    go, release = tmp_path / "go", tmp_path / "release"
    marks.mkdir()
    received.mkdir()
    with running_node(tmp_path / "node", cpus=2) as node:
        client = _submitted(tmp_path, CLIENT, node, str(marks), str(go), str(release))
        with killed_after(client):
            wait_until(lambda: len(list(marks.glob("started-*"))) == 2)
        wait_until(lambda: "gone: its jobs go on" in node.log_text())
        go.touch()
        try:
            wait_until(lambda: len(list(marks.glob("sent-*"))) == 2)
            for n in range(2):
                sent, said = (marks / f"sent-{n}").read_text().split(" ", 1)
                assert sent == "-1", said  # the client did not write it (yet)
                assert "the node keeps it for the client's recover_jobs" in said
            said: list[str] = []
            first = _recover(tmp_path, node.secret, received, 3.0, said)
        finally:
            release.touch()
        # Job 1 still ran: its latest provisional result; job 0 its result.
        assert first == [
            [int(JobStatus.Finished), 0],
            [int(JobStatus.ProvisionalResult), "half of 1"],
        ]
        for n in range(2):
            assert (received / f"out-{n}.txt").read_text() == f"file of job {n}"
        # One line for the files, not one a file (a script's stderr stays quiet).
        saved = [line for line in said if line.startswith("saved")]
        assert saved == [
            f"saved 2 files jobs sent, kept by {node.spec}, under {received}"
        ]
        again = _recover(tmp_path, node.secret, received, 60.0)
    assert again == [[int(JobStatus.Finished), 0], [int(JobStatus.Finished), 10]]


#: One job that waits for ``go``, sends a file of ``size`` bytes and notes what
#: dispy_send_file returned and said.
IN_FLIGHT = """
import sys, time
import dispynb as dispy

def job(marks, go, size):
    import contextlib, io, os, time
    open(os.path.join(marks, "started"), "w").close()
    while not os.path.exists(go):
        time.sleep(0.02)
    with open("large.bin", "wb") as handle:
        handle.write(bytes(range(256)) * (size // 256))
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        sent = dispy_send_file("large.bin")
    # Written whole, then renamed: the test reads it once it exists.
    mark = "sent"
    with open(os.path.join(marks, "~" + mark), "w") as handle:
        handle.write("%d %s" % (sent, said.getvalue()))
    os.replace(os.path.join(marks, "~" + mark), os.path.join(marks, mark))
    return sent

node, secret, journal, marks, go, size = sys.argv[1:]
cluster = dispy.JobCluster(job, nodes=[node], secret=secret, recover_file=journal)
cluster.submit(marks, go, int(size))
print("submitted", flush=True)
time.sleep(300)  # killed before it gets further
"""


def _queued(port: int) -> int:
    """Bytes waiting in this host's TCP queues of connections to or from ``port``
    (sent and not taken, received and not read)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            rows = handle.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            ports = {int(fields[1].rsplit(":", 1)[1], 16)}
            ports.add(int(fields[2].rsplit(":", 1)[1], 16))
            if port in ports:
                tx, rx = fields[4].split(":")
                total += int(tx, 16) + int(rx, 16)
    return total


def test_a_file_in_flight_when_the_client_dies_is_kept_for_recovery(
    tmp_path: Path,
) -> None:
    """The client is stopped (SIGSTOP: it reads nothing, answers nothing) while its
    job sends a 16 MiB file, then killed (SIGKILL) with the file on its way: the
    node keeps the file as it keeps one sent a moment later, the job is told so,
    and `recover_jobs` in a new process saves it (before: not kept, the job told
    the file was not saved)."""
    marks, received, go = tmp_path / "marks", tmp_path / "received", tmp_path / "go"
    size = 16 << 20
    marks.mkdir()
    received.mkdir()
    with running_node(tmp_path / "node", cpus=1) as node:
        client = _submitted(tmp_path, IN_FLIGHT, node, str(marks), str(go), str(size))
        with killed_after(client):
            wait_until(lambda: (marks / "started").exists())
            client.send_signal(signal.SIGSTOP)
            go.touch()
            # The file is on its way: megabytes the client does not read.
            wait_until(lambda: _queued(node.port) > 1 << 20)
        wait_until(lambda: (marks / "sent").exists())
        sent, said = (marks / "sent").read_text().split(" ", 1)
        assert sent == "-1", said  # the client did not write it
        assert "the node keeps it for the client's recover_jobs" in said, said
        jobs = _recover(tmp_path, node.secret, received, 60.0)
    assert jobs == [[int(JobStatus.Finished), -1]]
    data = (received / "large.bin").read_bytes()
    assert data == bytes(range(256)) * (size // 256)


#: One job that waits for ``go``, sends 3 files of 400 kB and notes what each
#: dispy_send_file returned and said.
THREE_FILES = """
import sys, time
import dispynb as dispy

def job(marks, go):
    import contextlib, io, os, time
    open(os.path.join(marks, "started"), "w").close()
    while not os.path.exists(go):
        time.sleep(0.02)
    for n in range(3):
        with open("out-%d.bin" % n, "wb") as handle:
            handle.write(bytes([n]) * 400_000)
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            sent = dispy_send_file("out-%d.bin" % n)
        # Written whole, then renamed: the test reads it once it exists.
        mark = "sent-%d" % n
        with open(os.path.join(marks, "~" + mark), "w") as handle:
            handle.write("%d %s" % (sent, said.getvalue()))
        os.replace(os.path.join(marks, "~" + mark), os.path.join(marks, mark))
    return 0

node, secret, journal, marks, go = sys.argv[1:]
cluster = dispy.JobCluster(job, nodes=[node], secret=secret, recover_file=journal)
cluster.submit(marks, go)
print("submitted", flush=True)
time.sleep(300)  # killed before it gets further
"""


def test_files_kept_in_memory_without_a_spool_stay_within_its_size(
    tmp_path: Path,
) -> None:
    """A node that cannot make its spool (``.kept`` is a file) keeps the files a
    job sends once its client was killed in memory, within --kept-results-size
    (1 MiB here): two of 400 kB are kept, the third is not, the node says so
    and its job is told (-1: the node could not keep it); `recover_jobs` saves
    the two. Before, every file was kept in memory, without a bound."""
    marks, received, go = tmp_path / "marks", tmp_path / "received", tmp_path / "go"
    marks.mkdir()
    received.mkdir()
    (tmp_path / "node" / "dest").mkdir(parents=True)
    (tmp_path / "node" / "dest" / ".kept").write_text("not a directory")
    with running_node(tmp_path / "node", "--kept-results-size", "1M") as node:
        client = _submitted(tmp_path, THREE_FILES, node, str(marks), str(go))
        with killed_after(client):
            wait_until(lambda: (marks / "started").exists())
        wait_until(lambda: "gone: its jobs go on" in node.log_text())
        assert "cannot spool results" in node.log_text()
        go.touch()
        wait_until(lambda: (marks / "sent-2").exists())
        told = [(marks / f"sent-{n}").read_text().split(" ", 1) for n in range(3)]
        assert all(sent == "-1" for sent, _said in told), told
        for _sent, said in told[:2]:
            assert "the node keeps it for the client's recover_jobs" in said, said
        assert "the node could not keep it" in told[2][1], told[2][1]
        assert "file 'out-2.bin' of job" in node.log_text()
        jobs = _recover(tmp_path, node.secret, received, 60.0)
    assert jobs == [[int(JobStatus.Finished), 0]]
    for n in range(2):
        assert (received / f"out-{n}.bin").read_bytes() == bytes([n]) * 400_000
    assert not (received / "out-2.bin").exists()


#: Three jobs (three CPUs: all on the node) that wait for ``go`` and return 400 kB.
THREE_RESULTS = """
import sys, time
import dispynb as dispy

def job(n, marks, go):
    import os, time
    open(os.path.join(marks, "started-%d" % n), "w").close()
    while not os.path.exists(go):
        time.sleep(0.02)
    return bytes([n]) * 400_000

node, secret, journal, marks, go = sys.argv[1:]
cluster = dispy.JobCluster(job, nodes=[node], secret=secret, recover_file=journal)
for n in range(3):
    cluster.submit(n, marks, go)
print("submitted", flush=True)
time.sleep(300)  # killed before it gets further
"""

#: Recovers; prints each job's status, its result's first byte and size (or
#: None), and its exception, in the order of the results' first bytes.
RECOVER_RESULTS = """
import json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(sys.argv[1], secret=sys.argv[2], timeout=float(sys.argv[3]))
rows = [
    [int(job.status), [job.result[0], len(job.result)] if job.result else None,
     job.exception or ""]
    for job in jobs
]
print(json.dumps(sorted(rows, key=lambda row: row[1] or [255])))
"""


def test_results_kept_in_memory_without_a_spool_stay_within_its_size(
    tmp_path: Path,
) -> None:
    """A node that cannot make its spool (``.kept`` is a file) keeps the results of
    a client that was killed in memory, within --kept-results-size (1 MiB here),
    as the files such jobs send: two of 400 kB are kept, the third to end is not
    (the node says so, naming its job) and `recover_jobs` reports that job ended
    without its result (Abandoned, the node could not keep it). Before, every
    result was kept in memory, without a bound."""
    marks, go = tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    (tmp_path / "node" / "dest").mkdir(parents=True)
    (tmp_path / "node" / "dest" / ".kept").write_text("not a directory")
    with running_node(tmp_path / "node", "--kept-results-size", "1M", cpus=3) as node:
        client = _submitted(tmp_path, THREE_RESULTS, node, str(marks), str(go))
        with killed_after(client):
            wait_until(lambda: len(list(marks.glob("started-*"))) == 3)
        wait_until(lambda: "gone: its jobs go on" in node.log_text())
        assert "cannot spool results" in node.log_text()
        go.touch()
        (tmp_path / "recover-results.py").write_text(RECOVER_RESULTS)
        proc = subprocess.run(
            [sys.executable, "recover-results.py", str(tmp_path / "journal.db"),
             node.secret, "60"],
            cwd=tmp_path, env=node_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        log = node.log_text()
    jobs = json.loads(proc.stdout.splitlines()[-1])
    kept, dropped = jobs[:2], jobs[2]
    assert [status for status, _result, _exc in kept] == [int(JobStatus.Finished)] * 2
    assert all(result[1] == 400_000 for _status, result, _exc in kept), kept
    assert dropped[:2] == [int(JobStatus.Abandoned), None], dropped
    assert "could not keep its result" in dropped[2], dropped
    assert re.search(r"result of job \d+ not kept: the node has no spool", log), log
