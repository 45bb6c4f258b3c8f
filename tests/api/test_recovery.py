"""Client crash recovery: kill -9 a client mid-run, recover its jobs elsewhere.
The recovery file's own life (default file, removal, exit): test_recovery_files.py."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import dispynb
from dispynb.errors import ConfigurationError
from dispynb.journal import Journal
from tests.api.crashclient import killed_after, start_client
from tests.jobs import WAIT, wait_until
from tests.nodeproc import running_node, start_node

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
    client = start_client(
        tmp_path,
        client_script,
        node.spec,
        node.secret,
        str(journal),
        str(marks),
        "slow" if all_slow else "mixed",
    )
    with killed_after(client):
        wait_until(lambda: len(list(marks.iterdir())) >= started)
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
