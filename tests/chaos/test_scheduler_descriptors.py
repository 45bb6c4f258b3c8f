"""A ``dispynb-scheduler`` at its file descriptor limit (``ulimit -n``, a systemd
unit's ``LimitNOFILE=``): each computation has a connection of its own to every node,
so a busy scheduler runs out of descriptors as clients come.

The client whose computation cannot reach its nodes must be told that the
scheduler is short of them, and what its operator can do, not that it is itself
(it was told to raise its own ``ulimit -n``, which changes nothing). A real node
and scheduler from the command line; the limit lowered on the running scheduler
(``prlimit --pid``) to what it holds plus one: the client's connection.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from dispynb.errors import SetupError
from tests.chaos.onenode import scheduler_over_one_node

pytestmark = pytest.mark.slow


def double(n: int) -> int:
    return 2 * n


def set_nofile(pid: int, soft: int) -> None:
    """Set the soft descriptor limit of the running process ``pid``."""
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(90)
def test_a_computation_the_scheduler_has_no_descriptor_for_says_whose_limit(
    tmp_path: Path,
) -> None:
    with scheduler_over_one_node(tmp_path) as (scheduler, credential):
        assert scheduler.proc is not None
        pid = scheduler.proc.pid
        before = resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]
        set_nofile(pid, len(os.listdir(f"/proc/{pid}/fd")) + 1)
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
