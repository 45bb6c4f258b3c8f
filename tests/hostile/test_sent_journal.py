"""A job (or the node running it) sends back, with ``dispy_send_file``, files named
as its client's recovery journal, the files SQLite keeps beside it, and a default
recovery file (``_dispy_*``) where ``recover_jobs()`` looks for the newest one.

Written, they replaced what ``recover_jobs`` unpickles as the client's own (past
``result_types``). The client refuses each, tells the job (-1, and why) and logs it
naming the file; the journal stays whole, and ``recover_jobs`` gets the job back
from it after the client is killed. So does ``recover_jobs`` for such files a node
kept for it. A real node process; a real client process.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import dispynb
from dispynb.job import JobStatus
from tests.jobs import WAIT, wait_until
from tests.nodeproc import node_env, running_node

#: What the job writes under each name: not a journal.
PLANTED = b"planted " * 512

#: The names the job sends, relative to its client's working directory (where
#: the client saves them: no files_dir), and one file the client does save.
JOURNAL_NAMES = [
    "journal.db",
    "journal.db-wal",
    "journal.db-shm",
    "journal.db-journal",
    "_dispy_29991231235959_1",
]
CONTROL = "ok.txt"

#: A client with recover_file=journal.db in its working directory, whose one job
#: sends each name, then returns what dispy_send_file returned. Given ``go``, the
#: job waits for it (made once the client is killed: the node keeps the files for
#: recover_jobs) and the client prints "submitted"; otherwise it prints the job's
#: status, result and stderr. Then it waits to be killed.
CLIENT = """
import json, os, sys, time
import dispynb as dispy

def plant(names, planted, go):
    while go and not os.path.exists(go):
        time.sleep(0.02)
    sent = []
    for name in names:
        with open(name, "wb") as handle:
            handle.write(planted)
        sent.append(dispy_send_file(name))
    return sent

node, secret, journal, names, planted, go = sys.argv[1:]
cluster = dispy.JobCluster(plant, nodes=[node], secret=secret, recover_file=journal)
job = cluster.submit(json.loads(names), planted.encode(), go)
if go:
    print("submitted", flush=True)
else:
    job()
    print(json.dumps([int(job.status), job.result, job.stderr]), flush=True)
time.sleep(300)  # killed: the journal stays for recover_jobs
"""


def _first_line_then_killed(script: str, cwd: Path, *args: str) -> tuple[str, str]:
    """Run client ``script`` with ``args`` in ``cwd``; kill it (SIGKILL) once it
    printed a line: (that line, its stderr: the client's log)."""
    client = subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=cwd, env=node_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = client.stdout.readline()  # type: ignore[union-attr]
        client.send_signal(signal.SIGKILL)
        client.wait(WAIT)
        return line, client.stderr.read()  # type: ignore[union-attr]
    finally:
        client.kill()
        client.stdout.close()  # type: ignore[union-attr]
        client.stderr.close()  # type: ignore[union-attr]


def _planted(directory: Path) -> list[str]:
    """The names of the files in ``directory`` holding `PLANTED`."""
    return sorted(
        path.name
        for path in directory.iterdir()
        if path.is_file() and PLANTED in path.read_bytes()
    )


@pytest.mark.slow
@pytest.mark.attack(
    id="sent-file-journal",
    title="A job sends files named as its client's recovery journal (and its "
    "-wal/-shm/-journal, and a _dispy_* default one)",
    goal="each refused (-1, the job told why, the client logs the file); the "
    "journal intact, recover_jobs gets the job",
)
def test_a_job_cannot_replace_its_clients_recovery_journal(
    measure, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.db"
    names = [*JOURNAL_NAMES, CONTROL]
    with running_node(tmp_path / "node") as node:
        line, log = _first_line_then_killed(
            CLIENT, tmp_path, node.spec, node.secret, str(journal),
            json.dumps(names), PLANTED.decode(), "",
        )  # fmt: skip
        assert line, log
        status, sent, said = json.loads(line)
        planted = _planted(tmp_path)
        recovered = dispynb.recover_jobs(str(journal), secret=node.secret, timeout=30)
    measure(
        f"dispy_send_file returned {sent}; planted files found: {planted or 'none'}; "
        f"recover_jobs: {[(int(j.status), j.result) for j in recovered]}"
    )
    assert status == int(JobStatus.Finished), said
    assert sent == [-1] * len(JOURNAL_NAMES) + [0], said
    assert planted == [CONTROL]
    assert not list(tmp_path.glob("_dispy_*"))
    for name in JOURNAL_NAMES:
        assert f"{name!r} not sent" in said, said
        assert name in log, log  # the client's log names it
    assert "recovery file" in said
    assert [(j.status, j.result) for j in recovered] == [(JobStatus.Finished, sent)]


@pytest.mark.slow
@pytest.mark.attack(
    id="kept-file-journal",
    title="A job whose client was killed sends files named as the recovery journal "
    "(and its -wal/-shm/-journal), kept by the node for recover_jobs",
    goal="recover_jobs refuses each (logged, naming the file); the journal intact, "
    "a second recover_jobs gets the job",
)
def test_recover_jobs_does_not_save_a_kept_file_over_its_journal(
    measure, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal, go = tmp_path / "journal.db", tmp_path / "go"
    names = [*JOURNAL_NAMES[:-1], CONTROL]
    with running_node(tmp_path / "node") as node:
        line, log = _first_line_then_killed(
            CLIENT, tmp_path, node.spec, node.secret, str(journal),
            json.dumps(names), PLANTED.decode(), str(go),
        )  # fmt: skip
        assert line.strip() == "submitted", log
        wait_until(lambda: "gone: its jobs go on" in node.log_text())
        go.touch()
        with caplog.at_level(logging.WARNING, logger="dispynb"):
            first = dispynb.recover_jobs(
                str(journal), secret=node.secret, files_dir=str(tmp_path), timeout=30
            )
        planted = _planted(tmp_path)
        again = dispynb.recover_jobs(str(journal), secret=node.secret, timeout=30)
    measure(
        f"files written with the planted bytes: {planted}; recover_jobs then: "
        f"{[(int(j.status), j.result) for j in first]}, again: "
        f"{[(int(j.status), j.result) for j in again]}"
    )
    assert planted == [CONTROL]
    for name in JOURNAL_NAMES[:-1]:
        assert f"{name!r}" in caplog.text and "recovery file" in caplog.text
    # The job's calls came while its client was gone: -1 each, the node kept them.
    assert [(j.status, j.result) for j in first] == [
        (JobStatus.Finished, [-1] * len(names))
    ]
    assert [(j.status, j.result) for j in again] == [
        (j.status, j.result) for j in first
    ]
