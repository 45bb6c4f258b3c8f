"""A kept result over `nodeserver.spoolcheck.MEMORY_COPY` on a node where no file
system makes files without a name (``--dest-path`` and TMPDIR on NFS): the node
will not send it (a copy in memory of any size let clients take the machine's
memory), so ``recover_jobs`` must tell the user what to do, and doing it must
get the result.

NFS cannot be mounted here: the node is given what the node checks, ``O_TMPFILE``
refused as NFS refuses it, by a ``sitecustomize`` on its ``PYTHONPATH``. A real
node from the command line, a real client killed with SIGKILL, ``recover_jobs``
in a new process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb import DispyJob
from tests.api.crashclient import killed_after, start_client
from tests.api.test_recovery_kept import (
    RECOVER_KEPT,
    kept_files,
    kill_client_with_kept_results,
)
from tests.jobs import wait_until
from tests.nodeproc import ROOT, start_node
from tests.ports import held_ports

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: The kept result: over the 64 MiB the node copies to memory.
RESULT = 80 * MiB

#: A node's ``sitecustomize``: files without a name refused, as NFS refuses them.
NO_UNNAMED_FILES = """\
import errno, os

_open = os.open


def _no_unnamed(path, flags, *args, **kwargs):
    if flags & os.O_TMPFILE == os.O_TMPFILE:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    return _open(path, flags, *args, **kwargs)


os.open = _no_unnamed
"""


#: Jobs of ``size`` bytes of result each (0: the int ``n * n``), each returning
#: once the test made its gate file ``gates/n``, after the client was killed: the
#: node keeps the results in the order the test opens the gates.
GATED_CLIENT = """
import sys, time
import dispynb as dispy

def make(n, size, marks, gates):
    import os, time
    data = os.urandom(size)
    open(os.path.join(marks, str(n)), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(gates, str(n))):
        if time.monotonic() > deadline:
            raise TimeoutError("the test opened no gate")
        time.sleep(0.01)
    return data if size else n * n

node, secret, journal, marks, gates = sys.argv[1:6]
cluster = dispy.JobCluster(make, nodes=[node], secret=secret, recover_file=journal)
for n, size in enumerate(sys.argv[6:]):
    cluster.submit_job_id("job-%d" % n, n, int(size), marks, gates)
print("submitted", flush=True)
time.sleep(60)  # killed before it gets further
"""


def recover(tmp_path: Path, journal: Path, secret: str) -> list[list[object]]:
    """What ``recover_jobs`` gives, in a new process: ``[id, status, result
    (type, size, digest), exception]`` of each job."""
    (tmp_path / "recover.py").write_text(RECOVER_KEPT)
    done = subprocess.run(
        [sys.executable, "recover.py", str(journal), secret, str(256 * MiB)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.timeout(150)
def test_a_large_kept_result_where_no_file_system_makes_unnamed_files(
    tmp_path: Path,
) -> None:
    """The user was told to put the node's TMPDIR "(or --dest-path)" on a local
    file system: a node moved to another --dest-path no longer has the results
    kept in the old one, and a TMPDIR changed without restarting the node changes
    nothing. Now the message says to restart the node with TMPDIR on a local file
    system and the same --dest-path; done, recover_jobs gets the result."""
    nfs = tmp_path / "nfs"
    nfs.mkdir()
    (nfs / "sitecustomize.py").write_text(NO_UNNAMED_FILES)
    with held_ports() as ports:
        fixed = ["--port", str(ports())]  # restarted where its client finds it
        launcher = ["env", f"PYTHONPATH={nfs}{os.pathsep}{ROOT}"]
        node = start_node(tmp_path / "node", *fixed, launcher=launcher)
        try:
            journal, expected = kill_client_with_kept_results(
                tmp_path, node, [f"bytes:{RESULT}"]
            )
            wait_until(lambda: len(kept_files(tmp_path / "node")) == 1)
            [[job_id, status, result, exception]] = recover(
                tmp_path, journal, node.secret
            )
            assert (job_id, status, result) == ("job-0", DispyJob.Abandoned, None)
            assert isinstance(exception, str)
            assert "makes files without a name (NFS?)" in exception, exception
            assert "restart the node with TMPDIR" in exception, exception
            assert "the same --dest-path" in exception, exception
            assert "--dest-path) on" not in exception, exception
            assert len(kept_files(tmp_path / "node")) == 1  # still kept
        finally:
            node.stop()
        (tmp_path / "node" / "port").unlink()
        with_tmpdir = start_node(tmp_path / "node", *fixed)  # TMPDIR fixed
        try:
            [[job_id, status, result, exception]] = recover(
                tmp_path, journal, with_tmpdir.secret
            )
        finally:
            with_tmpdir.stop()
    assert (job_id, status, result, exception) == (
        "job-0",
        DispyJob.Finished,
        expected[0],
        None,
    )


@pytest.mark.timeout(150)
def test_the_results_kept_behind_one_the_node_cannot_send_are_recovered(
    tmp_path: Path,
) -> None:
    """The large result kept first, three small ones after it: recover_jobs got
    none of them (the node stopped at the one it could not copy, and the others
    waited for a node restarted with TMPDIR on a local file system). Now it gets
    the small ones, and the large one is abandoned saying what to do."""
    nfs = tmp_path / "nfs"
    nfs.mkdir()
    (nfs / "sitecustomize.py").write_text(NO_UNNAMED_FILES)
    launcher = ["env", f"PYTHONPATH={nfs}{os.pathsep}{ROOT}"]
    marks, gates, journal = tmp_path / "marks", tmp_path / "gates", tmp_path / "j.db"
    marks.mkdir()
    gates.mkdir()
    node = start_node(tmp_path / "node", cpus=4, launcher=launcher)
    try:
        client = start_client(
            tmp_path, GATED_CLIENT, node.spec, node.secret, str(journal),
            str(marks), str(gates), str(RESULT), "0", "0", "0",
        )  # fmt: skip
        with killed_after(client):
            wait_until(lambda: len(list(marks.iterdir())) == 4)
        (gates / "0").touch()
        wait_until(lambda: len(kept_files(tmp_path / "node")) == 1)
        for n in (1, 2, 3):
            (gates / str(n)).touch()
        wait_until(lambda: len(kept_files(tmp_path / "node")) == 4)
        jobs = recover(tmp_path, journal, node.secret)
        assert len(kept_files(tmp_path / "node")) == 4  # all still kept
    finally:
        node.stop()
    assert jobs[1:] == [[f"job-{n}", DispyJob.Finished, n * n, None] for n in (1, 2, 3)]
    [job_id, status, result, exception] = jobs[0]
    assert (job_id, status, result) == ("job-0", DispyJob.Abandoned, None)
    assert isinstance(exception, str)
    assert "restart the node with TMPDIR" in exception, exception
