"""A client whose disk fills up under its recovery file while results arrive.

The client runs in a mount namespace of its own whose ``recover_file`` folder is a
1 MiB tmpfs; a real ``dispynb-node`` (outside) runs its jobs, whose results do not
all fit in the journal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.api.test_recovery_kept import kept_files
from tests.jobs import wait_until
from tests.nodeproc import ROOT, node_env, running_node

pytestmark = pytest.mark.slow

JOBS = 20
RESULT = 200_000

CLIENT = f"""
import json, sqlite3, sys
import dispynb as dispy

def compute(n):
    import os
    return os.urandom({RESULT})

node, secret, journal = sys.argv[1:4]
cluster = dispy.JobCluster(compute, nodes=[node], secret=secret, recover_file=journal)
jobs = [cluster.submit(n) for n in range({JOBS})]
cluster.wait(timeout=60)
right = [job.status == dispy.DispyJob.Finished and len(job.result) == {RESULT}
         for job in jobs]
with sqlite3.connect(journal) as db:
    (journaled,) = db.execute(
        "SELECT count(*) FROM jobs WHERE result IS NOT NULL").fetchone()
print(json.dumps([sum(right), journaled, [job.exception for job in jobs]]), flush=True)
input()  # killed here: the node keeps what was not journaled
"""


@pytest.mark.attack(
    id="journal-disk-full",
    title=f"{JOBS} results of {RESULT // 1000} kB for a client whose recover_file "
    "lies on a 1 MiB file system",
    goal="every job finishes, the node kept; one warning naming the file and the fix; "
    "the node keeps the results not journaled (was: node dropped, jobs Abandoned)",
)
@pytest.mark.timeout(120)
def test_a_full_disk_under_the_recovery_file_loses_no_job(tmp_path, measure):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs in a mount namespace needs root and unshare")
    (tmp_path / "client.py").write_text(CLIENT)
    folder = tmp_path / "journal"
    folder.mkdir()
    mount = f'mount -t tmpfs -o size=1m tmpfs "{folder}" && exec "$@"'
    with running_node(tmp_path / "node", cpus=2) as node:
        client = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh",
             sys.executable, "client.py", node.spec, node.secret,
             str(folder / "journal.db")],
            cwd=tmp_path, env=node_env(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None and client.stderr is not None
            line = client.stdout.readline()
            assert line, client.communicate(timeout=10)
            right, journaled, exceptions = json.loads(line)
            # The client dies: the node writes what it still keeps to its spool.
            client.send_signal(signal.SIGKILL)
            client.wait(10)
            stderr = client.stderr.read()
            unjournaled = JOBS - journaled
            wait_until(lambda: len(kept_files(tmp_path / "node")) >= unjournaled)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
            for stream in (client.stdin, client.stdout, client.stderr):
                if stream is not None:
                    stream.close()
    kept = len(kept_files(tmp_path / "node"))
    warnings = stderr.count("cannot write the recovery file")
    measure(
        f"{right}/{JOBS} jobs finished right, {journaled} journaled, {kept} kept by "
        f"the node; {warnings} warning(s)"
    )
    assert right == JOBS, (exceptions, stderr)
    assert 0 < journaled < JOBS  # the disk filled up on the way
    assert warnings == 1, stderr
    assert str(folder / "journal.db") in stderr and "free room" in stderr
    assert "Traceback" not in stderr and "lost" not in stderr, stderr
    assert kept >= unjournaled


CREATE = """
import sys
import dispynb as dispy
from dispynb.errors import ConfigurationError

try:
    dispy.JobCluster(abs, nodes=["127.0.0.1:9"], secret="s" * 32,
                     recover_file=sys.argv[1])
except ConfigurationError as exc:
    print(exc)
"""


def test_a_recovery_file_a_full_disk_cannot_create_is_a_clear_error(tmp_path):
    """Before: sqlite3.OperationalError('database or disk is full') from
    JobCluster(), naming neither the option nor the file."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs in a mount namespace needs root and unshare")
    folder = tmp_path / "journal"
    folder.mkdir()
    fill = f'mount -t tmpfs -o size=1m tmpfs "{folder}" && cat /dev/zero > "{folder}/x"'
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f'{fill}; exec "$@"', "sh", sys.executable, "-c", CREATE,
         str(folder / "journal.db")],
        cwd=ROOT, env=node_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.strip() == (
        f"recover_file {str(folder / 'journal.db')!r} cannot be written: database "
        "or disk is full; give one on a disk with room, or recover_file=False"
    ), done.stderr
