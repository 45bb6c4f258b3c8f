"""One ``recover_file`` given to two clusters at once (two processes of one
script, or two clusters of a notebook): the one that closes cleanly forgets its
own computation, and leaves the file to the other, which may still crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispynb import JobCluster
from dispynb.journal import Journal
from tests.api.crashclient import killed_after, start_client
from tests.api.test_recovery import CLIENT, recover_in_new_process
from tests.jobs import wait_until
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


def cube(n: int) -> int:
    return n**3


def test_a_clean_close_leaves_another_clusters_jobs_in_a_shared_recover_file(
    tmp_path: Path,
) -> None:
    """Before: the first cluster to close cleanly removed the file, with the
    other's records (and that one went on writing to the removed file): after
    its crash, recover_jobs found nothing."""
    journal, marks = tmp_path / "journal.db", tmp_path / "marks"
    marks.mkdir()
    with running_node(tmp_path / "node", cpus=20) as node:
        client = start_client(
            tmp_path, CLIENT, node.spec, node.secret, str(journal), str(marks),
            "mixed",
        )  # fmt: skip
        with killed_after(client):
            wait_until(lambda: len(list(marks.iterdir())) == 20)
            # Meanwhile another cluster, with the same file, runs and closes.
            with JobCluster(
                cube, nodes=[node.spec], secret=node.secret, recover_file=str(journal)
            ) as cluster:
                assert [cluster.submit(n)() for n in range(3)] == [0, 1, 8]
            assert journal.exists()
        opened = Journal.open_existing(str(journal))
        assert opened is not None and len(opened.computations()) == 1  # not cube's
        opened.close()
        done = recover_in_new_process(tmp_path, journal, node.secret)
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout)
    assert [job[0] for job in jobs] == [f"job-{n}" for n in range(20)]
    assert [job[3] for job in jobs] == [n * n for n in range(20)]


def test_a_clean_close_alone_removes_the_recover_file(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    with (
        running_node(tmp_path / "node", cpus=2) as node,
        JobCluster(
            cube, nodes=[node.spec], secret=node.secret, recover_file=str(journal)
        ) as cluster,
    ):
        assert cluster.submit(2)() == 8
        assert journal.exists()
    assert not any(tmp_path.glob("journal.db*"))
