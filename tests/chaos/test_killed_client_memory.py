"""A client killed (SIGKILL: a user's ``kill -9``, a Jupyter kernel restarted) while
its job runs on a node that keeps its results for ``recover_jobs``: the job's large
result, kept on the node's disk, must not stay in the node's memory too.

A real node from the command line, a real client killed with SIGKILL.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.api.test_recovery_kept import kept_files, kill_client_with_kept_results
from tests.jobs import wait_until
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: The job's result: far more than a node takes to run.
RESULT = 128 * MiB


@pytest.mark.timeout(90)
def test_a_result_for_a_killed_client_leaves_the_nodes_memory_once_kept(
    tmp_path: Path,
) -> None:
    """The node tried to send the result to the client it had lost: each write to
    the closed connection raised its one stored error again, whose traceback grew
    the frames of each write, the result with them, in a cycle only a collection
    of cycles frees (an idle node seldom runs one). The node held the result (128
    MiB) in memory besides the file it kept it in, for hours. Now it lets it go
    once it is kept."""
    with running_node(tmp_path / "node") as node:
        server = psutil.Process(node.proc.pid)
        before = server.memory_info().rss
        kill_client_with_kept_results(tmp_path, node, [f"bytes:{RESULT}"])
        wait_until(lambda: len(kept_files(tmp_path / "node")) == 1)
        rss: list[int] = []

        def let_go() -> bool:
            rss.append(server.memory_info().rss)
            return rss[-1] < before + RESULT // 2

        try:
            wait_until(let_go, timeout=10)
        except AssertionError:
            raise AssertionError(
                f"the node holds {(rss[-1] - before) / MiB:.0f} MiB more than before "
                f"the job ({before / MiB:.0f} MiB)"
            ) from None
