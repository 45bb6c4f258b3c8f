"""Tracebacks of jobs recovered after a client crash point at the script's lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb.journal import Journal
from dispynb.tracebacks import SourceMap
from tests.api.crashclient import killed_after, start_client
from tests.jobs import wait_until
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

CLIENT = """
import os, sys, time
import dispynb as dispy

def compute(marks):
    open(os.path.join(marks, "started"), "w").close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the client is gone
        if os.path.exists(os.path.join(marks, "release")):
            break
        time.sleep(0.01)
    check(41)

def check(n):
    if n != 42:
        raise ValueError("not the answer: %d" % n)

options = {} if sys.argv[3] == "default" else {"recover_file": sys.argv[3]}
cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]], secret=sys.argv[2], **options)
job = cluster.submit(sys.argv[4])
print("submitted", flush=True)
time.sleep(60)  # killed before it gets further
"""

RECOVER = """
import json, sys
import dispynb as dispy
file = None if sys.argv[1] == "default" else sys.argv[1]
jobs = dispy.recover_jobs(file, timeout=30, secret=sys.argv[2])
print(json.dumps([[int(j.status), j.exception] for j in jobs]))
"""


@pytest.mark.parametrize("recover_file", ["journal.db", "default"])
def test_a_job_that_failed_while_the_client_was_gone_shows_the_script_lines(
    tmp_path: Path, recover_file: str
) -> None:
    """The job fails after the client was SIGKILLed; ``recover_jobs`` in a new
    process shows its traceback at ``client.py``'s lines, with the source, as the
    cluster would have (not cloudpickle's ``<dynamic-code>``): with the user's
    ``recover_file`` and with dispy's default file of a script."""
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "recover.py").write_text(RECOVER)
    with running_node(tmp_path / "node") as node:
        argv = [node.spec, node.secret, recover_file, str(marks)]
        with killed_after(start_client(tmp_path, CLIENT, *argv)):
            wait_until(lambda: (marks / "started").exists())
        # The job ends once the node knows the client is gone (it would reach the
        # dead connection otherwise).
        wait_until(lambda: "client of computation compute gone" in node.log_text())
        (marks / "release").touch()
        done = subprocess.run(
            [sys.executable, "recover.py", recover_file, node.secret],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    [[status, exception]] = json.loads(done.stdout)
    assert status == 9, exception  # Terminated: dispy's status of a job that raised
    assert "<dynamic-code>" not in exception, exception
    script = tmp_path / "client.py"
    lines = exception.splitlines()
    at_check = lines.index(f'  File "{script}", line 16, in check')
    assert lines[at_check + 1].strip() == 'raise ValueError("not the answer: %d" % n)'
    assert f'  File "{script}", line 12, in compute' in lines, exception
    assert lines[-1] == "ValueError: not the answer: 41"


def test_a_journal_without_a_source_map_recovers_as_before(tmp_path: Path) -> None:
    """A journal of an older version (no ``sources`` table) has no map: None."""
    journal = Journal(str(tmp_path / "journal.db"))
    journal._db.execute("DROP TABLE sources")
    journal.computation("abc", "compute")
    assert journal.sources_of("abc") is None
    journal.close()


def test_a_source_map_survives_json() -> None:
    """What the journal keeps maps a traceback as the map it was taken from."""

    def failing() -> None:
        raise ValueError("boom")

    original = SourceMap.of(failing)
    line = failing.__code__.co_firstlineno + 1
    text = (
        "Traceback (most recent call last):\n"
        f'  File "<dynamic-code>", line {line}, in failing\n'
        "ValueError: boom\n"
    )
    copy = SourceMap.from_json(original.to_json())
    assert copy.rerender(text) == original.rerender(text)
    assert 'raise ValueError("boom")' in copy.rerender(text)
