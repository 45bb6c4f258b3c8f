"""A job (or the node running it) sends back, with ``dispy_send_file``, files named
as its client's recovery journal, the files SQLite keeps beside it, and a default
recovery file (``_dispy_*``) where ``recover_jobs()`` looks for the newest one.

Written, they replaced what ``recover_jobs`` unpickles as the client's own (past
``result_types``). The client refuses each, tells the job (-1, and why) and logs it
naming the file; the journal stays whole, and ``recover_jobs`` gets the job back
from it after the client is killed. A real node process; a real client process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import dispynb
from dispynb.job import JobStatus
from tests.jobs import WAIT
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
#: sends each name; it prints the job's result and stderr, then waits to be killed.
CLIENT = """
import json, sys, time
import dispynb as dispy

def plant(names, planted):
    sent = []
    for name in names:
        with open(name, "wb") as handle:
            handle.write(planted)
        sent.append(dispy_send_file(name))
    return sent

node, secret, journal, names, planted = sys.argv[1:]
cluster = dispy.JobCluster(plant, nodes=[node], secret=secret, recover_file=journal)
job = cluster.submit(json.loads(names), planted.encode())
job()
print(json.dumps([int(job.status), job.result, job.stderr]), flush=True)
time.sleep(300)  # killed: the journal stays for recover_jobs
"""


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
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, node.spec, node.secret, str(journal),
             json.dumps(names), PLANTED.decode()],
            cwd=tmp_path, env=node_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None
            line = client.stdout.readline()
            client.send_signal(signal.SIGKILL)
            client.wait(WAIT)
        finally:
            client.kill()
            client.stdout.close()  # type: ignore[union-attr]
            log = client.stderr.read()  # type: ignore[union-attr]
            client.stderr.close()  # type: ignore[union-attr]
        assert line, log
        status, sent, said = json.loads(line)
        planted = sorted(
            path.name
            for path in tmp_path.iterdir()
            if path.is_file() and PLANTED in path.read_bytes()
        )
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
