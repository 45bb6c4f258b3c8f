"""The recovery file's life: dispy's default one (``_dispy_<time>_<pid>``) written
and found by ``recover_jobs()``, removed after a clean close or once every result was
collected, none when turned off or for a LocalCluster; ``recover_jobs`` on a missing
file; a script left open (or interrupted) at exit closes its clusters, the file
removed. Recovering a killed client's jobs: test_recovery.py."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import dispynb
from dispynb._live import EXIT_WAIT
from tests.api.crashclient import killed_after, start_client
from tests.jobs import WAIT, wait_until
from tests.nodeproc import CliNode, running_node
from tests.sigint import python_handles_sigint

pytestmark = pytest.mark.slow


def test_recover_file_removed_after_clean_close(local, tmp_path):
    journal = tmp_path / "journal.db"
    with dispynb.JobCluster(abs, nodes=local, recover_file=str(journal)) as cluster:
        assert cluster.submit(-2)() == 2
        assert journal.exists()
    assert not journal.exists()


def test_recover_jobs_missing_file_says_so_and_returns_no_job(tmp_path, caplog):
    """As dispy's: recover_jobs on a recover_file that does not exist (never
    written, or removed: a default file is once a recovery found every job) goes
    on with no job; the log names the file."""
    missing = str(tmp_path / "none.db")
    with caplog.at_level(logging.WARNING, logger="dispynb"):
        assert dispynb.recover_jobs(missing) == []
    assert f"{missing!r} does not exist" in caplog.text
    assert not os.path.exists(missing)  # nothing created in its place


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
    (tmp_path / "recover.py").write_text(DEFAULT_RECOVER)
    with running_node(tmp_path / "node", cpus=10) as node:
        args = (node.spec, node.secret, str(marks))
        client = start_client(tmp_path, DEFAULT_CLIENT, *args, said="even ones done")
        with killed_after(client):
            wait_until(lambda: len(list(marks.iterdir())) == 10)  # all started
            [recover_file] = default_files(tmp_path)  # written as dispy's is
            assert re.fullmatch(r"_dispy_\d{14}_\d+", recover_file.name)
            assert stat.S_IMODE(recover_file.stat().st_mode) == 0o600
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
import atexit, logging, os, sys
import dispynb as dispy

# dispynb's debug log for a failure's message; warnings still on stderr.
_debug = logging.FileHandler("debug.log")
_debug.setFormatter(
    logging.Formatter("%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
)
_shown = logging.StreamHandler()
_shown.setLevel(logging.WARNING)
logging.getLogger("dispynb").handlers[:] = [_debug, _shown]
logging.getLogger("dispynb").setLevel(logging.DEBUG)

def compute(n, release):
    import os, time
    open("%s.started-%d" % (release, n), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n

def job_status(job):  # as dispy's job_scheduler.py: each result submits the next
    print("job %d: %s %r" % (job.id, job.status, job.result), flush=True)
    if job.id < 2 and job.status == dispy.DispyJob.Finished:
        cluster.submit(job.id + 1, release).id = job.id + 1

release = sys.argv[3]
cluster = dispy.JobCluster(
    compute, nodes=[sys.argv[1]], secret=sys.argv[2], job_status=job_status
)
cluster.submit(0, release).id = 0
# Runs before the cluster's own exit hook (registered when it was created).
atexit.register(print, "exiting without close()", flush=True)
"""


def _exiting_client(tmp_path: Path, node: Any) -> subprocess.Popen[str]:
    """The script above, its first line ("exiting ...") read: it is in its exit.

    Read from the pipe itself, byte by byte: ``readline()`` reads ahead into the
    file object's buffer, which ``communicate()`` never looks at (it reads the
    pipe), so a callback's line printed before this read began was lost (a loaded
    CI machine)."""
    # With SIGINT handled here: a terminal's foreground job has Python's handler,
    # where a background job of a shell (CI's run, `cmd &`) inherits SIGINT
    # ignored, and a Ctrl-C would then never reach the script.
    with python_handles_sigint():  # exec turns the handler into SIG_DFL
        proc = subprocess.Popen(
            [sys.executable, "client.py", node.spec, node.secret, str(tmp_path / "go")],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group, as a terminal's foreground job
        )
    assert proc.stdout is not None
    first = b""
    while not first.endswith(b"\n"):
        byte = os.read(proc.stdout.fileno(), 1)  # b"" at the end: the script died
        if not byte:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"the script ended before its exit: {err}")
        first += byte
    assert first == b"exiting without close()\n"
    return proc


def _logs(tmp_path: Path, node: CliNode, err: str) -> str:
    """A failure's message: the script's stderr, the node's log, dispynb's debug
    log in the script."""
    debug = tmp_path / "debug.log"
    return (
        f"{err}\n--- node log:\n{node.log_text()}\n--- the script's debug log:\n"
        f"{debug.read_text() if debug.exists() else '(none)'}"
    )


def test_a_script_left_open_waits_at_exit_for_its_jobs_as_dispy(tmp_path):
    """A script that ends without wait() or close() while its jobs run: as dispy's
    exit (its close() waits for them), the jobs and those their callbacks submit
    finish, then the node is released and the default recovery file removed.
    Before, they were terminated at once."""
    (tmp_path / "client.py").write_text(EXITING)
    with running_node(tmp_path / "node") as node:
        proc = _exiting_client(tmp_path, node)
        try:
            (tmp_path / "go").touch()
            out, err = proc.communicate(timeout=WAIT)
        finally:
            proc.kill()
            proc.communicate()
        assert proc.returncode == 0, _logs(tmp_path, node, err)
        expected = [f"job {n}: 11 {n * n}" for n in range(3)]
        assert out.splitlines() == expected, _logs(tmp_path, node, err)
        wait_until(lambda: "disconnected" in node.log_text())
        assert "results kept" not in node.log_text()  # closed, not kept
    assert default_files(tmp_path, sidecars=True) == []


def test_ctrl_c_while_a_script_waits_at_exit_terminates_its_jobs(tmp_path):
    """Ctrl-C (SIGINT to the script's process group, as a terminal sends it) while
    the exit waits for the jobs: they are terminated, their callbacks told, and
    the script ends with the cluster closed, the node released."""
    (tmp_path / "client.py").write_text(EXITING)
    with running_node(tmp_path / "node") as node:
        proc = _exiting_client(tmp_path, node)
        try:
            # Once it runs: a job still on its way is another race (cancel/start).
            wait_until(lambda: (tmp_path / "go.started-0").exists())
            os.killpg(proc.pid, signal.SIGINT)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        _assert_exit_terminated(proc, node, tmp_path)
    assert default_files(tmp_path, sidecars=True) == []


def _assert_exit_terminated(
    proc: subprocess.Popen[str], node: CliNode, tmp_path: Path
) -> None:
    """EXITING's exit, interrupted, ends well: job 0 Terminated and its callback
    told, the interruption said, the cluster closed (the node released, no results
    kept for a client that is gone)."""
    try:
        # Within the exit's own bound for the terminated jobs, and some.
        out, err = proc.communicate(timeout=EXIT_WAIT + WAIT)
    finally:
        proc.kill()
        proc.communicate()
    logs = _logs(tmp_path, node, err)
    assert proc.returncode == 0, logs
    assert out.splitlines() == ["job 0: 9 None"], logs  # Terminated
    assert "interrupted at exit: the jobs not done are terminated" in err, logs
    wait_until(lambda: "disconnected" in node.log_text())
    assert "results kept" not in node.log_text()


# EXITING, its exit interrupted just as the clusters' hook begins: a SIGINT raised
# by the hook before it, in C (no Python line runs between the two hooks), is
# pending when Python starts running the clusters' hook.
EXIT_BEGINS_INTERRUPTED = EXITING.replace(
    "# Runs before",
    """while not os.path.exists(release + ".started-0"):  # job 0 runs: no race
    import time; time.sleep(0.01)
import ctypes, signal
atexit.register(getattr(ctypes.CDLL(None), "raise"), int(signal.SIGINT))
# Runs before""",
)


def test_ctrl_c_as_the_exit_begins_to_wait_terminates_the_jobs(tmp_path):
    """A Ctrl-C that lands as the clusters' exit hook begins (between two exit
    hooks) terminates the jobs as one during the wait does: before, Python raised
    it before the hook's first line, atexit printed it and went on, and the
    cluster was never closed (its job ran on at the node, kept for a client that
    was gone; one CI run under load met it through the test above)."""
    assert "atexit.register(getattr(ctypes" in EXIT_BEGINS_INTERRUPTED
    (tmp_path / "client.py").write_text(EXIT_BEGINS_INTERRUPTED)
    with running_node(tmp_path / "node") as node:
        proc = _exiting_client(tmp_path, node)
        _assert_exit_terminated(proc, node, tmp_path)
    assert default_files(tmp_path, sidecars=True) == []


INTERRUPTED = """
import sys
import dispynb as dispy

def compute(n, release):
    import os, time
    deadline = time.monotonic() + 60
    # Started once the script waits in job(): a Ctrl-C before (in submit(), the
    # job already on its node) would end it before it named the job 0.
    while not os.path.exists(release + ".waiting") and time.monotonic() < deadline:
        time.sleep(0.01)
    open("%s.started" % release, "w").close()
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n

def job_status(job):
    print("job %d: %s %r" % (job.id, job.status, job.result), flush=True)

cluster = dispy.JobCluster(
    compute, nodes=[sys.argv[1]], secret=sys.argv[2], job_status=job_status
)
job = cluster.submit(0, sys.argv[3])
job.id = 0
open(sys.argv[3] + ".waiting", "w").close()
job()  # Ctrl-C here ends the script
"""


def test_a_script_ended_by_ctrl_c_terminates_its_jobs_at_exit(tmp_path):
    """Ctrl-C while the script waits for a job ends it (KeyboardInterrupt): its
    exit terminates the jobs not done, as a second Ctrl-C during the exit's wait
    does, instead of waiting for them in silence (a job of an hour held the
    script, its node's CPU, and a shared scheduler's, for that hour)."""
    (tmp_path / "client.py").write_text(INTERRUPTED)
    with running_node(tmp_path / "node") as node:
        with python_handles_sigint():  # as in _exiting_client
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "client.py",
                    node.spec,
                    node.secret,
                    str(tmp_path / "go"),
                ],
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        try:
            wait_until(lambda: (tmp_path / "go.started").exists())
            os.killpg(proc.pid, signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=EXIT_WAIT + WAIT)
            except subprocess.TimeoutExpired:
                raise AssertionError("the script still waits for its job") from None
        finally:
            (tmp_path / "go").touch()  # the job may end (the node stops then)
            proc.kill()
            proc.communicate()
        assert "KeyboardInterrupt" in err
        assert out.splitlines() == ["job 0: 9 None"], err  # Terminated
        assert "interrupted: the jobs not done are terminated" in err
        wait_until(lambda: "disconnected" in node.log_text())
        assert "results kept" not in node.log_text()
    assert default_files(tmp_path, sidecars=True) == []
