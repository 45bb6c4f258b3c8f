"""What a node killed whole (SIGKILL to its cgroup, as a batch system ends a job)
leaves in its directory, and what the next node started there removes of it
(`nodeserver.leftovers`). Real nodes from the command line, in a cgroup of their
own where the machine allows.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from dispynb import JobCluster
from tests.chaos.outcomes import alive
from tests.chaos.test_tree_kill import cgroup_launcher, kill_tree, own_cgroup
from tests.jobs import wait_until
from tests.nodeproc import start_node

pytestmark = pytest.mark.slow


def write_here(name: str) -> str:
    """Write the file ``name`` in the job's directory; that directory."""
    import os

    with open(name, "w") as handle:
        handle.write(name)
    return os.getcwd()


@pytest.mark.timeout(90)
def test_files_kept_in_a_dest_path_shared_with_a_cleanup_computation_outlive_a_kill(
    tmp_path: Path,
) -> None:
    """Two clusters give the node one ``dest_path``: one with ``cleanup=False``
    keeps what its jobs write there for the user (as in dispy), one with cleanup
    removes its own. The node is killed whole while both run. Before, the next node
    started there followed the note of the cleanup one and removed the shared
    directory, the kept files with it; now a directory a kept computation noted is
    left, whatever another noted of it."""
    with own_cgroup() as group:
        node = start_node(tmp_path / "node", cpus=2, launcher=cgroup_launcher(group))
        try:
            options = {
                "nodes": [node.spec],
                "secret": node.secret,
                "dest_path": "shared",
            }
            with (
                JobCluster(write_here, cleanup=False, **options) as kept,
                JobCluster(write_here, **options) as scratch,
            ):
                where = Path(kept.submit("kept.txt")())
                assert scratch.submit("scratch.txt")() == str(where)
                server = psutil.Process(node.proc.pid)
                pids = {server.pid} | {p.pid for p in server.children(True)}
                kill_tree(node, group)
                wait_until(lambda: not [pid for pid in pids if alive(pid)])
            assert (where / "kept.txt").exists()  # as a killed node leaves it
            back = start_node(tmp_path / "node", cpus=1)
            try:
                notes = tmp_path / "node" / "dest" / ".remove"
                wait_until(lambda: not list(notes.iterdir()))  # swept
                assert (where / "kept.txt").read_text() == "kept.txt"
            finally:
                back.stop()
        finally:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
