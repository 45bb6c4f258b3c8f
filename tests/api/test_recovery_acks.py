"""A client with ``recover_file`` tells its nodes which results it has journaled
(`ResultsJournaled`), and they keep only the others for its recovery: with real
node processes, what the node keeps on disk, and that a client killed between
receiving results and journaling them loses none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dispynb import DispyJob, JobCluster
from tests.api.test_recovery import recover_in_new_process
from tests.api.test_recovery_kept import kept_files
from tests.jobs import wait_until
from tests.nodeproc import running_node


def kept_dirs(node_dir: Path) -> list[Path]:
    """The spool directories of the computations a node keeps."""
    return list((node_dir / "dest" / ".kept").glob("*/meta"))


def square(n: int) -> int:
    return n * n


def test_results_the_client_journaled_are_not_kept_on_the_node(tmp_path: Path) -> None:
    """Every result reaches the journal, and none is left in the node's spool
    while the cluster is open (before: one file per result until it closed)."""
    with running_node(tmp_path / "node", cpus=2) as node:
        cluster = JobCluster(
            square,
            nodes=[node.spec],
            secret=node.secret,
            recover_file=str(tmp_path / "journal.db"),
        )
        with cluster:
            jobs = [cluster.submit(n) for n in range(40)]
            assert [job() for job in jobs] == [n * n for n in range(40)]
            cluster.wait(timeout=30)
            # The node keeps this computation (its spool directory is there)...
            assert len(kept_dirs(tmp_path / "node")) == 1
            # ...but none of its results: all 40 are journaled and acknowledged.
            assert kept_files(tmp_path / "node") == []


#: The start of a client that receives its results but never journals them (as if
#: killed right before its journal's commit): it prints "received" at the first,
#: then hangs. Each job marks that it runs, then waits for the test's "go" file.
#: The client's cluster follows (here and in tests/sharedsched/test_kept_acks.py).
NEVER_JOURNALING = """
import sys, time
import dispynb as dispy
import dispynb.journal

def stuck(self, recovery_id, *job):
    print("received", flush=True)
    time.sleep(600)

dispynb.journal.Journal.done = dispynb.journal.Journal.done_many = stuck

def compute(n, folder):
    import os, time
    open(os.path.join(folder, "marks", str(n)), "w").close()
    go, deadline = os.path.join(folder, "go"), time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n
"""

UNJOURNALED_CLIENT = (
    NEVER_JOURNALING
    + """
cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]], secret=sys.argv[2],
                           recover_file=sys.argv[3])
jobs = [cluster.submit(n, sys.argv[4]) for n in range(10)]
time.sleep(60)  # killed before it gets further
"""
)


def test_a_client_killed_before_journaling_its_results_recovers_them(
    tmp_path: Path,
) -> None:
    """Results the client received but had not journaled (nor acknowledged) when
    it died are kept by the node, which writes them to disk as it loses the client,
    and recover_jobs returns every one."""
    (tmp_path / "client.py").write_text(UNJOURNALED_CLIENT)
    (tmp_path / "marks").mkdir()
    journal = tmp_path / "journal.db"
    with running_node(tmp_path / "node", cpus=10) as node:
        client = subprocess.Popen(
            [sys.executable, "client.py", node.spec, node.secret, str(journal),
             str(tmp_path)],
            cwd=tmp_path, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None
            # All 10 run on the node; then they end and the client gets results.
            wait_until(lambda: len(list((tmp_path / "marks").iterdir())) == 10)
            (tmp_path / "go").touch()
            assert client.stdout.readline().strip() == "received"
            # Not acknowledged: the node holds them in memory, not on disk yet.
            assert kept_files(tmp_path / "node") == []
            client.kill()
            client.wait()
        finally:
            client.kill()
            client.stdout.close()  # type: ignore[union-attr]
        # The client is gone: all 10 results go to the node's spool.
        wait_until(lambda: len(kept_files(tmp_path / "node")) == 10)
        done = recover_in_new_process(tmp_path, journal, node.secret)
        assert done.returncode == 0, done.stderr
        jobs = json.loads(done.stdout)
        assert [job[1] for job in jobs] == list(range(10))
        assert [job[2] for job in jobs] == [DispyJob.Finished] * 10
        assert [job[3] for job in jobs] == [n * n for n in range(10)]
