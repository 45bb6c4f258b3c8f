"""A ``dispynb-scheduler`` at its file descriptor limit (``ulimit -n``, a systemd
unit's ``LimitNOFILE=``): each computation has a connection of its own to every node,
so a busy scheduler runs out of descriptors as clients come.

The client whose computation cannot reach its nodes must be told that the
scheduler is short of them, and what its operator can do, not that it is itself
(it was told to raise its own ``ulimit -n``, which changes nothing). A real node
and scheduler from the command line; the limit lowered on the running scheduler
(``prlimit --pid``) to what it holds and one more: the client's connection.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from dispynb import DispyJob, SharedJobCluster
from dispynb.errors import SetupError
from tests.chaos.onenode import scheduler_over_one_node

pytestmark = pytest.mark.slow


def double(n: int) -> int:
    return 2 * n


def set_nofile(pid: int, soft: int) -> None:
    """Set the soft descriptor limit of the running process ``pid``."""
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def leave_descriptors(pid: int, spare: bool) -> int:
    """Lower the limit of ``pid`` so that it can open one more descriptor if
    ``spare``, else none: a new one takes the lowest free number, and the limit
    bounds the number (those open above it stay). Returns the limit it had."""
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest = next(n for n in range(len(used) + 1) if n not in used)
    set_nofile(pid, lowest + int(spare))
    return before


@pytest.mark.timeout(90)
def test_a_computation_the_scheduler_has_no_descriptor_for_says_whose_limit(
    tmp_path: Path,
) -> None:
    with scheduler_over_one_node(tmp_path) as (scheduler, credential):
        assert scheduler.proc is not None
        pid = scheduler.proc.pid
        before = leave_descriptors(pid, spare=True)  # the client's connection
        with pytest.raises(SetupError) as raised:
            SharedJobCluster(
                double, scheduler_host=scheduler.address, secret_file=str(credential)
            )
        set_nofile(pid, before)
        with SharedJobCluster(
            double, scheduler_host=scheduler.address, secret_file=str(credential)
        ) as cluster:
            assert cluster.submit(21)() == 42  # descriptors back: served again
        log = scheduler.log_text()
        node = scheduler.nodes[0]
    said = (
        f"{node}: the scheduler is out of file descriptors (Too many open files, limit "
    )
    assert said in str(raised.value), raised.value
    assert "its operator can raise the limit (LimitNOFILE=" in str(raised.value)
    assert "this client" not in str(raised.value)
    warned = [line for line in log.splitlines() if "out of file descriptors" in line]
    assert len(warned) == 1 and " WARNING " in warned[0], warned


def sized(size: int) -> bytes:
    return b"x" * size


@pytest.mark.timeout(90)
def test_a_large_result_the_scheduler_has_no_descriptor_to_check_ends_its_job(
    tmp_path: Path,
) -> None:
    """The first large message a process gets has its MAC checked with a cipher
    imported then, which takes a descriptor. At the limit, that import failed in
    the read callback of the node's connection at every read: the connection was
    never read again, the job never ended (and asyncio logged each failure). Now
    the connection ends with the error, the job ends saying it, and the node is
    used again once descriptors are back."""
    with (
        scheduler_over_one_node(tmp_path) as (scheduler, credential),
        SharedJobCluster(
            sized, scheduler_host=scheduler.address, secret_file=str(credential)
        ) as cluster,
    ):
        assert scheduler.proc is not None
        assert cluster.submit(10)() == b"x" * 10  # small: no cipher yet
        before = leave_descriptors(scheduler.proc.pid, spare=False)
        try:
            job = cluster.submit(1 << 20)
            assert cluster.wait(timeout=30), job.status
        finally:
            set_nofile(scheduler.proc.pid, before)
        assert job.status == DispyJob.Abandoned, job.status
        assert "Too many open files" in str(job.exception), job.exception
        again = cluster.submit(1 << 20)
        assert again() == b"x" * (1 << 20), (again.status, again.exception)
