"""``JobCluster.put`` on a client whose disk cannot hold the object's file.

The client is a real process whose file size limit (``RLIMIT_FSIZE``: the same
failing write as a full disk, ``EFBIG`` for ``ENOSPC``) is under the object's size;
its node is a real node server, outside the limit.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from dispynb import LocalCluster
from tests.nodeproc import ROOT

pytestmark = pytest.mark.slow

#: A client whose disk holds 1 MB a file: a 4 MB object does not fit, a small one
#: does (argv: the node, its secret).
_CLIENT = """
import json, os, sys
from dispynb import JobCluster
from dispynb.errors import ClusterError

with JobCluster(len, nodes=[sys.argv[1]], secret=sys.argv[2],
                recover_file=False) as cluster:
    try:
        cluster.put(b"x" * 4_000_000)
        error = None
    except ClusterError as exc:
        error = str(exc)
    directory = cluster._objects_dir
    left = {name: os.path.getsize(os.path.join(directory, name))
            for name in os.listdir(directory)}
    small = cluster.put(b"y" * 1000)
    print(json.dumps([error, left, cluster.submit(small)()]))
"""


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


def test_an_object_the_disk_cannot_hold_is_refused_saying_so_and_leaves_nothing(
    local: LocalCluster, tmp_path
):
    """It raised a bare OSError and left the part written (as much as the disk
    held) until the cluster closed: a full disk stayed full."""
    (node,) = local.node_specs()
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, node, local.secret],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)},
        preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    error, left, small = json.loads(done.stdout)
    assert error is not None
    assert error.startswith("cannot put the object: its file of 4000058 bytes in ")
    assert "(File too large); free room on that disk, or set TMPDIR" in error
    assert len(left) == 0  # nothing of the object that did not fit
    assert small == 1000  # the client goes on
