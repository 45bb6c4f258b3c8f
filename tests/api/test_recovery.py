"""Client crash recovery: kill -9 a client mid-run, recover its jobs elsewhere."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import dispynb
from dispynb._live import EXIT_WAIT
from dispynb.errors import ConfigurationError
from dispynb.journal import Journal
from tests.jobs import WAIT, wait_until
from tests.nodeproc import CliNode, running_node, start_node
from tests.sigint import python_handles_sigint

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

#: CLIENT with dispy's idiom for ids: each job renamed once submitted.
RENAMING_CLIENT = CLIENT.replace(
    """jobs = [cluster.submit_job_id("job-%d" % n, n, sys.argv[4], all_slow)
        for n in range(20)]""",
    """for n in range(20):
    job = cluster.submit(n, sys.argv[4], all_slow)
    job.id = "job-%d" % n""",
)

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
    journal = kill_client_mid_run(tmp_path, node, started, all_slow)
    done = recover_in_new_process(tmp_path, journal, node.secret, recover)
    assert done.returncode == 0, done.stderr
    assert node.secret not in journal.read_bytes().decode("latin-1")  # never kept
    return json.loads(done.stdout)


def kill_client_mid_run(
    tmp_path: Path,
    node: Any,
    started: int,
    all_slow: bool = False,
    client_script: str = CLIENT,
) -> Path:
    """Run CLIENT until ``started`` jobs run on the node, SIGKILL it; its journal."""
    journal = tmp_path / "journal.db"
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "client.py").write_text(client_script)
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
    return journal


def recover_in_new_process(
    tmp_path: Path, journal: Path, secret: str, recover: str = RECOVER
) -> subprocess.CompletedProcess[str]:
    """Run ``recover`` (a script printing the jobs as JSON) on ``journal``."""
    (tmp_path / "recover.py").write_text(recover)
    return subprocess.run(
        [sys.executable, "recover.py", str(journal), secret],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_recover_jobs_after_client_sigkill_returns_every_job_once(tmp_path):
    """20 jobs running on a node when the client dies; half end while it is dead."""
    with running_node(tmp_path / "node", cpus=20) as node:
        jobs = run_and_kill_client(tmp_path, node, started=20)
    assert [job[0] for job in jobs] == [f"job-{n}" for n in range(20)]
    assert [job[1] for job in jobs] == list(range(20))
    assert all(job[2] == 11 for job in jobs), jobs
    assert [job[3] for job in jobs] == [n * n for n in range(20)]


#: CLIENT whose jobs run two minutes, each leaving its process id in its mark.
ENDLESS_CLIENT = CLIENT.replace(
    'open(os.path.join(marks, str(n)), "w").close()',
    'open(os.path.join(marks, str(n)), "w").write(str(os.getpid()))',
).replace("time.sleep(1.0 if n % 2 or all_slow else 0.0)", "time.sleep(120)")


def test_recover_jobs_terminate_pending_terminates_the_jobs_still_running(tmp_path):
    """As dispy's: with terminate_pending, the jobs still running when the timeout
    passes are terminated on their node (its CPUs free at once) and returned
    Terminated; those it had not started, Cancelled; those never sent, Abandoned.
    Before, terminate_pending did nothing: they came back Running and ran on."""
    assert "time.sleep(120)" in ENDLESS_CLIENT and "getpid" in ENDLESS_CLIENT
    recover = RECOVER.replace("timeout=30", "timeout=1, terminate_pending=True")
    with running_node(tmp_path / "node", cpus=2) as node:
        journal = kill_client_mid_run(
            tmp_path, node, started=2, client_script=ENDLESS_CLIENT
        )
        pids = [int(mark.read_text()) for mark in (tmp_path / "marks").iterdir()]
        done = recover_in_new_process(tmp_path, journal, node.secret, recover)
        assert done.returncode == 0, done.stderr
        jobs = json.loads(done.stdout)
        wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids))
    statuses = [job[2] for job in jobs]
    assert statuses.count(9) == 2, jobs  # the two running
    assert set(statuses) <= {8, 9, 10}, jobs  # none left Running


def test_recover_jobs_returns_the_jobs_still_running_at_timeout_running(tmp_path):
    """A job sent to its node and not ended at the timeout comes back Running, on
    that node, as the docstring says (and as dispy's status of a job sent): it
    came back Created, no node named, as if it had never left the client."""
    recover = RECOVER.replace("timeout=30", "timeout=1").replace(
        "j.exception]", "j.exception, j.ip_addr]"
    )
    with running_node(tmp_path / "node", cpus=2) as node:
        journal = kill_client_mid_run(
            tmp_path, node, started=2, client_script=ENDLESS_CLIENT
        )
        done = recover_in_new_process(tmp_path, journal, node.secret, recover)
        assert done.returncode == 0, done.stderr
        # Done with them: the node's CPUs free for the next test.
        ended = recover.replace("timeout=1", "timeout=0, terminate_pending=True")
        recover_in_new_process(tmp_path, journal, node.secret, ended)
    jobs = json.loads(done.stdout)
    running = [job for job in jobs if job[2] == dispynb.DispyJob.Running]
    assert len(running) >= 2, jobs  # at least the two that run
    assert all(job[5] == "127.0.0.1" for job in running), running
    assert {job[2] for job in jobs} <= {6, 10}, jobs  # or never sent: Abandoned


def test_recover_jobs_returns_the_jobs_running_at_timeout_with_their_start(tmp_path):
    """A job that started on its node and still runs at the timeout comes back
    Running with the time it started, as the crashed client showed it (it came
    back with no start time: the node had told that client only)."""
    recover = RECOVER.replace("timeout=30", "timeout=1").replace(
        "j.exception]", "j.exception, j.start_time]"
    )
    before = time.time()
    with running_node(tmp_path / "node", cpus=2) as node:
        journal = kill_client_mid_run(
            tmp_path, node, started=2, client_script=ENDLESS_CLIENT
        )
        marks = list((tmp_path / "marks").iterdir())  # the jobs that started
        began = [mark.stat().st_mtime for mark in marks]
        done = recover_in_new_process(tmp_path, journal, node.secret, recover)
        assert done.returncode == 0, done.stderr
        ended = recover.replace("timeout=1", "timeout=0, terminate_pending=True")
        recover_in_new_process(tmp_path, journal, node.secret, ended)
    jobs = json.loads(done.stdout)
    started = [job for job in jobs if job[0] in {f"job-{m.name}" for m in marks}]
    assert [job[2] for job in started] == [dispynb.DispyJob.Running] * 2, jobs
    for job in started:
        assert job[5] is not None, job
        assert before - 1 <= job[5] <= max(began) + 1, (job, began)


#: CLIENT on a node of one CPU: job 0 runs until ``marks/go`` exists, job 1 (two
#: minutes) waits for its CPU behind it on the node.
QUEUED_CLIENT = CLIENT.replace(
    "time.sleep(1.0 if n % 2 or all_slow else 0.0)",
    """while not n and not os.path.exists(os.path.join(marks, "go")):
        time.sleep(0.02)
    time.sleep(120 if n else 0)""",
).replace("for n in range(20)", "for n in range(2)")

#: RECOVER with a timeout of 3 s, job 0 let go once the node was asked for the
#: jobs, and each job's start printed.
RECOVER_THEN_GO = """
import json, logging, os, sys
import dispynb as dispy

class Go(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("asked "):
            open(os.path.join(sys.argv[3], "go"), "w").close()

log = logging.getLogger("dispynb.recovery")
log.setLevel(logging.DEBUG)
log.addHandler(Go())
jobs = dispy.recover_jobs(sys.argv[1], timeout=3, secret=sys.argv[2])
print(json.dumps([[j.id, int(j.status), j.start_time] for j in jobs]))
"""


def test_a_job_that_starts_while_recover_jobs_waits_comes_back_with_its_start(
    tmp_path,
):
    """A job that waited on its node (behind another) when the client died, and
    starts while recover_jobs waits for it, comes back Running with its start
    time: the node tells the recovering client the starts, as it told the client
    that died (it told that gone client's session, never the recovering one)."""
    with running_node(tmp_path / "node", cpus=1) as node:
        journal = kill_client_mid_run(
            tmp_path, node, started=1, client_script=QUEUED_CLIENT
        )
        marks = tmp_path / "marks"
        (tmp_path / "recover.py").write_text(RECOVER_THEN_GO)
        done = subprocess.run(
            [sys.executable, "recover.py", str(journal), node.secret, str(marks)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        ended = RECOVER.replace("timeout=30", "timeout=0, terminate_pending=True")
        recover_in_new_process(tmp_path, journal, node.secret, ended)
    jobs = json.loads(done.stdout)
    assert jobs[0][:2] == ["job-0", dispynb.DispyJob.Finished], jobs
    assert jobs[1][:2] == ["job-1", dispynb.DispyJob.Running], jobs
    began = (marks / "1").stat().st_mtime
    assert jobs[1][2] is not None, jobs
    assert abs(jobs[1][2] - began) <= 1, (jobs, began)


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


def test_recover_jobs_returns_the_ids_the_user_gave_after_submit(tmp_path):
    """dispy's ``job = cluster.submit(n); job.id = n``: the recovered jobs carry
    those ids (before, the default ids the jobs had at submit: 1, 2, ...)."""
    with running_node(tmp_path / "node", cpus=20) as node:
        journal = kill_client_mid_run(
            tmp_path, node, started=20, client_script=RENAMING_CLIENT
        )
        done = recover_in_new_process(tmp_path, journal, node.secret)
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout)
    assert [job[0] for job in jobs] == [f"job-{n}" for n in range(20)]
    assert [job[3] for job in jobs] == [n * n for n in range(20)]


def test_recover_jobs_with_another_secret_is_a_clear_error_that_loses_nothing(
    tmp_path,
):
    """A wrong secret (or none) stops recover_jobs with one line saying so, and
    leaves the journal as it was: the right secret then gets every result (before,
    each job was journaled Abandoned for good: 'could not be reached')."""
    with running_node(tmp_path / "node", cpus=20) as node:
        journal = kill_client_mid_run(tmp_path, node, started=20)
        for secret, said in (("not-the-secret", "another secret"), ("", "no secret")):
            refused = recover_in_new_process(tmp_path, journal, secret)
            assert refused.returncode == 1
            last = refused.stderr.strip().splitlines()[-1]
            assert last.startswith("dispynb.errors.AuthenticationError: "), last
            assert said in last and node.spec in last and "unchanged" in last
            assert "During handling" not in refused.stderr  # one error, not a chain
        done = recover_in_new_process(tmp_path, journal, node.secret)
    assert_every_job_recovered(done)


def test_recover_jobs_while_the_node_is_down_gets_its_jobs_once_it_is_back(tmp_path):
    """The node is stopped (its results kept on disk) when recover_jobs runs: its
    jobs come back Abandoned, saying so, but are not journaled as such; after a
    restart with the same command line, recover_jobs gets them all."""
    node = start_node(tmp_path / "node", cpus=20)
    try:
        journal = kill_client_mid_run(tmp_path, node, started=20)
        assert node.stop() == 0  # drains: the running jobs end and are kept
        down = recover_in_new_process(tmp_path, journal, node.secret)
        assert down.returncode == 0, down.stderr
        jobs = json.loads(down.stdout)
        unreached = [job for job in jobs if job[2] != 11]
        assert unreached, jobs  # the odd ones ended after the client was killed
        assert all(job[2] == 10 for job in unreached), jobs
        assert all("recover_jobs again" in job[4] for job in unreached), jobs
        (tmp_path / "node" / "port").unlink()
        node = start_node(
            tmp_path / "node", "--port", str(node.port), cpus=20, secret=node.secret
        )
        done = recover_in_new_process(tmp_path, journal, node.secret)
    finally:
        node.stop()
    assert_every_job_recovered(done)


#: CLIENT whose odd jobs run 8 s: still running while recover_jobs waits for them.
LONG_CLIENT = CLIENT.replace("time.sleep(1.0 if", "time.sleep(8.0 if")

#: recover_jobs as dispy's docs call it (no timeout: it waits for running jobs),
#: logging when it asked the node.
RECOVER_WAITING = """
import json, logging, sys
import dispynb as dispy
logging.basicConfig(level=logging.WARNING)
logging.getLogger("dispynb.recovery").setLevel(logging.DEBUG)
jobs = dispy.recover_jobs(sys.argv[1], secret=sys.argv[2])
print(json.dumps([[j.id, j._args[0], int(j.status), j.result, j.exception]
                  for j in jobs]))
"""


def test_recover_jobs_gives_up_a_node_that_stops_answering_and_gets_its_jobs_later(
    tmp_path,
):
    """The node is stopped (SIGSTOP) while recover_jobs, given no timeout, waits for
    its running jobs: the call returns them Abandoned, saying the node fell silent,
    instead of waiting for ever; once the node runs again, recover_jobs gets them."""
    node = start_node(tmp_path / "node", cpus=20)
    try:
        journal = kill_client_mid_run(tmp_path, node, 20, client_script=LONG_CLIENT)
        (tmp_path / "recover.py").write_text(RECOVER_WAITING)
        log = tmp_path / "recover.log"
        with open(log, "w") as stderr:
            recovering = subprocess.Popen(
                [sys.executable, "recover.py", str(journal), node.secret],
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        with recovering:
            try:
                wait_until(lambda: "asked " in log.read_text())
                node.proc.send_signal(signal.SIGSTOP)
                try:
                    out, _ = recovering.communicate(timeout=45)
                finally:
                    node.proc.send_signal(signal.SIGCONT)
            finally:
                recovering.kill()
        assert recovering.returncode == 0, log.read_text()
        jobs = json.loads(out)
        waited = [job for job in jobs if job[2] != 11]
        assert waited, jobs  # the odd ones were running
        for job in waited:
            assert job[2] == 10, jobs  # Abandoned
            assert "sent nothing for" in job[4], job
            assert "recover_jobs again" in job[4], job
        done = recover_in_new_process(tmp_path, journal, node.secret)
    finally:
        node.stop()
    assert_every_job_recovered(done)


def assert_every_job_recovered(done: subprocess.CompletedProcess[str]) -> None:
    """``done`` (a RECOVER script's run) got all 20 of CLIENT's jobs, Finished."""
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout)
    assert [job[2] for job in jobs] == [11] * 20, jobs
    assert [job[3] for job in jobs] == [n * n for n in range(20)]


def a_journal(path: Path) -> Path:
    """A journal of 20 jobs with 10 kB of arguments each (several SQLite pages)."""
    journal = Journal(str(path))
    journal.computation("r1", "compute")
    for key in range(20):
        journal.submitted("r1", key, dispynb.DispyJob(key, (b"x" * 10_000,), {}))
    journal.close()
    return path


def test_recover_jobs_on_a_damaged_or_foreign_file_is_one_clear_error(tmp_path):
    """Each names the file and says what is wrong, with no sqlite3 or OS traceback
    chained to it, and leaves the file as it was."""
    truncated = a_journal(tmp_path / "truncated.db")
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(bytes(range(256)) * 20)
    foreign = tmp_path / "foreign.db"
    with contextlib.closing(sqlite3.connect(foreign)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
    before = foreign.read_bytes()
    cases = {
        truncated: "is damaged or not a dispynb recovery file",
        garbage: "is damaged or not a dispynb recovery file",
        foreign: "is not a dispynb recovery file",
        tmp_path: "is a directory",
    }
    for path, said in cases.items():
        with pytest.raises(ConfigurationError, match=said) as raised:
            dispynb.recover_jobs(str(path))
        assert str(path) in str(raised.value)
        error = raised.value
        assert error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__
    assert foreign.read_bytes() == before  # no journal tables added to it
    empty = tmp_path / "empty.db"  # a client killed as it created its journal
    empty.touch()
    assert dispynb.recover_jobs(str(empty)) == []


#: Sends jobs one at a time with the client's I/O loop idle, so that the submitting
#: thread writes each to the node itself (`LoopRunner.enter`), until the journal
#: recorded one as sent from that thread; prints its id. Jobs other than the first
#: wait for the ``go`` file (made after the client was killed).
DIRECT_CLIENT = """
import json, sys, threading, time
import dispynb as dispy
from dispynb.journal import Journal

sent_by_me = {}
journal_sent = Journal.sent
def sent(self, recovery_id, keys, node):
    for key in keys:
        sent_by_me[key] = threading.current_thread() is threading.main_thread()
    journal_sent(self, recovery_id, keys, node)
Journal.sent = sent

def compute(n, go):
    import os, time
    deadline = time.monotonic() + 60
    while n and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n

node, secret, journal, go = sys.argv[1:5]
cluster = dispy.JobCluster(compute, nodes=[node], secret=secret, recover_file=journal)
assert cluster.submit_job_id("job-0", 0, go)() == 0
for n in range(1, 8):
    job = cluster.submit_job_id("job-%d" % n, n, go)
    if sent_by_me.get(job._key):
        break
    time.sleep(0.2)  # the loop was busy: try again once it waits for I/O
print(json.dumps([n, sent_by_me.get(job._key, False)]), flush=True)
time.sleep(60)  # killed before it gets further
"""


def test_a_job_the_submitting_thread_sent_is_journaled_as_sent_and_recovered(
    tmp_path: Path,
) -> None:
    """With the I/O loop idle, the submitting thread sends a job itself, and the
    journal records it as sent there and then (the loop thread does not do it
    later): a client SIGKILLed right after recovers it, run once, with its result,
    and not as a job that never reached its node."""
    journal, go = tmp_path / "journal.db", tmp_path / "go"
    (tmp_path / "client.py").write_text(DIRECT_CLIENT)
    with running_node(tmp_path / "node", cpus=8) as node:
        client = subprocess.Popen(
            [sys.executable, "client.py", node.spec, node.secret, str(journal),
             str(go)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None
            last, direct = json.loads(client.stdout.readline())
            assert direct, "no job was sent by the submitting thread"
            # Its row says sent, to the node, already: nothing was left to the loop.
            (recovery_id, _name, _nodes), *_ = Journal(str(journal)).computations()
            keys = {job.id: key for key, job, _at in
                    Journal(str(journal)).jobs(recovery_id)}  # fmt: skip
            with contextlib.closing(sqlite3.connect(journal)) as db:
                row = db.execute(
                    "SELECT status, node FROM jobs WHERE key = ?",
                    (keys[f"job-{last}"],),
                ).fetchone()
            assert row == (dispynb.DispyJob.Running, node.spec)
            client.send_signal(signal.SIGKILL)
            client.wait(WAIT)
        finally:
            client.kill()
            client.stdout.close()  # type: ignore[union-attr]
            go.touch()  # its jobs end now, its client gone: the node keeps them
        jobs = dispynb.recover_jobs(str(journal), timeout=30, secret=node.secret)
    got = {job.id: (job.status, job.result) for job in jobs}
    assert got[f"job-{last}"] == (dispynb.DispyJob.Finished, last * last)
    assert len(jobs) == len(got) == last + 1


def test_recover_file_removed_after_clean_close(local, tmp_path):
    journal = tmp_path / "journal.db"
    with dispynb.JobCluster(abs, nodes=local, recover_file=str(journal)) as cluster:
        assert cluster.submit(-2)() == 2
        assert journal.exists()
    assert not journal.exists()


def test_recover_jobs_missing_file_says_so_and_returns_no_job(tmp_path, caplog):
    """As dispy's: a recovery script run again (its file removed by the recovery that
    found every job) goes on with no job; the log names the file."""
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
import atexit, os, sys
import dispynb as dispy

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
    """The script above, its first line ("exiting ...") read: it is in its exit."""
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
    assert proc.stdout.readline() == "exiting without close()\n"
    return proc


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
        assert proc.returncode == 0, err
        assert out.splitlines() == [f"job {n}: 11 {n * n}" for n in range(3)], err
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
        _assert_exit_terminated(proc, node)
    assert default_files(tmp_path, sidecars=True) == []


def _assert_exit_terminated(proc: subprocess.Popen[str], node: CliNode) -> None:
    """EXITING's exit, interrupted, ends well: job 0 Terminated and its callback
    told, the interruption said, the cluster closed (the node released, no results
    kept for a client that is gone)."""
    try:
        # Within the exit's own bound for the terminated jobs, and some.
        out, err = proc.communicate(timeout=EXIT_WAIT + WAIT)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["job 0: 9 None"], err  # Terminated
    assert "interrupted at exit: the jobs not done are terminated" in err
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
        _assert_exit_terminated(proc, node)
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
