"""A node whose ``--dest-path`` disk is full: a job filled it (a scratch file that
grew until ENOSPC), then returned, while its client was gone.

The node keeps such a job's result for the client's ``recover_jobs``; its spool is
on that disk. A real node from the command line, its ``--dest-path`` a 512 KiB tmpfs
of its own (a user and mount namespace: ``unshare -rm``, no privilege needed), a
real client process killed with SIGKILL.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb import DispyJob, recover_jobs
from tests.jobs import WAIT, wait_until
from tests.nodeproc import node_env, running_node

pytestmark = pytest.mark.slow


def _small_disk(directory: Path) -> list[str]:
    """A launcher (`tests.nodeproc.start_node`) that runs the node with a 512 KiB
    tmpfs mounted on ``directory``; skips the test where namespaces are refused."""
    unshare = shutil.which("unshare")
    mount = ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs"]
    if unshare is None:
        pytest.skip("no unshare(1) here")
    probe = subprocess.run(
        [unshare, "-rm", *mount, str(directory)], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"no user and mount namespace here: {probe.stderr.strip()}")
    script = f'{" ".join(mount)} "$0" && exec "$@"'
    return [unshare, "-rm", "sh", "-c", script, str(directory)]


#: ``NODE SECRET JOURNAL MARKS GO``: one job that fills its disk once told to.
CLIENT = """
import sys, time
import dispynb

def fill(n, marks, go):
    import errno, os, time
    open(os.path.join(marks, str(n)), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with open("scratch", "wb") as scratch:  # in the job's directory
            while True:
                scratch.write(b"x" * 65536)
                scratch.flush()
    except OSError as exc:
        return (n, errno.errorcode[exc.errno])

cluster = dispynb.JobCluster(
    fill, nodes=[sys.argv[1]], secret=sys.argv[2], recover_file=sys.argv[3]
)
cluster.submit(7, sys.argv[4], sys.argv[5]).id = "seven"
time.sleep(60)  # killed before this ends
"""


@pytest.mark.timeout(90)
def test_a_result_that_its_full_disk_cannot_keep_is_kept_in_memory(
    tmp_path: Path,
) -> None:
    """Before, the node logged that it could not spool the result and dropped it:
    `recover_jobs` returned the job Abandoned ("the node ran the job but could not
    keep its result"), though the node keeps results in memory where it has no
    spool."""
    dest, marks, go = tmp_path / "node" / "dest", tmp_path / "marks", tmp_path / "go"
    dest.mkdir(parents=True)
    marks.mkdir()
    journal = tmp_path / "journal"
    (tmp_path / "client.py").write_text(CLIENT)
    with running_node(tmp_path / "node", launcher=_small_disk(dest)) as node:
        args = [node.spec, node.secret, str(journal), str(marks), str(go)]
        client = subprocess.Popen(
            [sys.executable, "client.py", *args], cwd=tmp_path, env=node_env()
        )
        try:
            wait_until(lambda: (marks / "7").exists(), timeout=30)
            client.kill()
            client.wait(WAIT)
            wait_until(lambda: "client of computation fill gone" in node.log_text())
        finally:
            go.touch()
            client.kill()
            client.wait(WAIT)
        [job] = recover_jobs(str(journal), timeout=30, secret=node.secret)
        log = node.log_text()
    assert "No space left on device" in log, log  # the disk was full
    assert (job.id, job.status, job.result) == (
        "seven",
        DispyJob.Finished,
        (7, "ENOSPC"),
    ), f"{job.exception}\n{log}"
