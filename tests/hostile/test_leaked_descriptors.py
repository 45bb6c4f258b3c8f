"""A job that leaks file descriptors until its worker has none left: the next job's
large arguments (passed through shared memory) fail saying so, not that the
client's shared memory was gone. Real ``dispynb-node``, real client, bounded waits.
"""

from __future__ import annotations

import os

import pytest

from dispynb import DispyJob, JobCluster
from tests.hostile.tools import limited_node

pytestmark = pytest.mark.slow


def leak_or_measure(data: bytes | None) -> int:
    """With no data: open ``/dev/null`` until the process has no descriptor left,
    keeping them (a leak); else the data's length."""
    import errno
    import os
    import resource

    if data is not None:
        return len(data)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    leaked = 0
    while True:
        try:
            os.open("/dev/null", os.O_RDONLY)
        except OSError as exc:
            assert exc.errno == errno.EMFILE
            return leaked
        leaked += 1


@pytest.mark.attack(
    id="worker-leaked-fds",
    title="a job leaks file descriptors up to its worker's limit; the next job on "
    "that worker gets 4 MiB of arguments",
    goal="the next job fails saying the worker is out of file descriptors (an "
    "earlier job leaked them) and how to fix it (was: 'gone, or not created by this "
    "node's client', which blames the client's shared memory)",
)
@pytest.mark.timeout(120)
def test_a_worker_out_of_descriptors_says_so_for_shared_memory_arguments(
    tmp_path, measure
):
    with (
        limited_node(tmp_path / "node", cpus=1) as node,
        JobCluster(leak_or_measure, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        leaked = cluster.submit(None)()
        job = cluster.submit(os.urandom(4 * 1024 * 1024))
        job()
    measure(f"{leaked} descriptors leaked; next job: {str(job.exception)[-300:]!r}")
    assert job.status == DispyJob.Terminated, job.status
    assert "gone, or not created" not in str(job.exception)
    assert "file descriptors" in str(job.exception), job.exception
