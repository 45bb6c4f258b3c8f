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
from nodeserver.spool import ResultSpool
from tests.chaos.outcomes import alive
from tests.chaos.test_tree_kill import cgroup_launcher, kill_tree, own_cgroup
from tests.jobs import wait_until
from tests.nodeproc import running_node, start_node

pytestmark = pytest.mark.slow

#: A client's recovery id.
RID = "5f3c0a9e1b2d4c6e8f00112233445566"


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
            (tmp_path / "node" / "port").unlink()  # the killed one's
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


@pytest.mark.timeout(90)
def test_a_spool_file_a_killed_node_was_writing_goes_with_its_next_start(
    tmp_path: Path,
) -> None:
    """A node killed as it wrote a kept result (``.r<...>.tmp``, renamed once
    whole) left it for good: never completed, counted in no --kept-results-size,
    and its spool's directory lives on while its results are kept. Now the next
    node taking that spool removes it; one another node is writing in its own
    spool (a running node's, beside it in the same --dest-path) stays."""
    dest = tmp_path / "node" / "dest"
    with own_cgroup() as group:
        killed = start_node(tmp_path / "node", launcher=cgroup_launcher(group))
        try:
            with running_node(tmp_path / "beside", "--dest-path", str(dest)) as beside:
                kill_tree(killed, group)
                [own] = [p for p in dest.glob(".kept-*") if p.is_dir()]  # beside's
                spool = ResultSpool(str(dest / ".kept"), 1 << 20)  # the killed one's
                kept = spool.create(RID, "comp")
                assert spool.write(kept, [1, 1, "finished", 0, 1, "", "", None, 1],
                                   [memoryview(b"r" * 1000)])  # fmt: skip
                [(whole, _size)] = kept.files
                # What the killed one left as it wrote its next result
                # (`nodeserver.spooldisk.write_file`), and what the running one writes.
                left = Path(kept.path) / f".{Path(whole).name}.tmp"
                left.write_bytes(b"r" * 500)
                writing = own / "0123" / f".{Path(whole).name}.tmp"
                writing.parent.mkdir()
                writing.write_bytes(b"w" * 500)
                (tmp_path / "node" / "port").unlink()  # the killed one's
                back = start_node(tmp_path / "node")
                try:
                    assert not left.exists()
                    assert Path(whole).exists()  # whole: offered to its client
                    assert writing.exists()
                    assert "partly written by a node killed" in back.log_text()
                finally:
                    back.stop()
                assert beside.proc.poll() is None
        finally:
            if killed.proc.poll() is None:
                killed.proc.kill()
                killed.proc.wait()
