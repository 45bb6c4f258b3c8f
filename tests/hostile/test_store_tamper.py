"""A job writes to a file it was given: the next computation gets the file as sent.

A computation's files are hard links to the node's content store, so a job that
appended to its ``depends`` file changed the stored copy, and every later
computation sending the same file to that node (another user's, or the next run of
the same notebook) got the changed one, without a word.
"""

from __future__ import annotations

import pytest

from dispynb import JobCluster
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


# --- run on nodes -------------------------------------------------------------


def append_to(name: str) -> str:
    with open(name, "a") as handle:
        handle.write("TAMPERED\n")
    with open(name) as handle:
        return handle.read()


def read(name: str) -> str:
    with open(name) as handle:
        return handle.read()


# --- tests ----------------------------------------------------------------------


@pytest.mark.attack(
    id="store-tamper",
    title="A job appends to a file it was given (depends); then another cluster "
    "sends the same file to that node",
    goal="the other cluster's job reads the file as sent (was: with the append)",
)
def test_a_file_a_job_changed_is_not_given_to_the_next_computation(
    tmp_path, monkeypatch, measure
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("as sent\n")
    with running_node(tmp_path / "node") as node:

        def run(function) -> str:
            with JobCluster(
                function, nodes=[node.spec], secret=node.secret, depends=["data.txt"]
            ) as cluster:
                job = cluster.submit("data.txt")
                result = job()
                assert result is not None, job.exception
                return result

        changed = run(append_to)
        again = run(read)
    measure(f"the job changed its copy to {changed!r}; the next cluster read {again!r}")
    assert changed == "as sent\nTAMPERED\n"
    assert again == "as sent\n"
