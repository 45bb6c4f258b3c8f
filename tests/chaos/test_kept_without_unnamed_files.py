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
