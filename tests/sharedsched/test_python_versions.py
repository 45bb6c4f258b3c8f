"""A shared scheduler whose nodes run different Python versions: a client whose
function travels as compiled code gets only the nodes of its own version (major.
minor), as a client connecting to nodes directly does (tests/api/
test_python_versions.py); with none of them, the cluster stops saying why.

The other version is announced by a wrapper (``platform.python_version()`` says
3.99.0) of a real ``dispynb-node`` on 127.0.0.1.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from dispynb.errors import SetupError
from tests.api.test_python_versions import WRAPPER
from tests.nodeproc import CliNode, running_node
from tests.sharedsched.harness import WAIT, SchedulerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SECRET = "nodes-of-two-pythons"


def node_name(_: int) -> str:
    return dispy_node_name  # type: ignore[name-defined]  # noqa: F821


@pytest.fixture
def other_python(tmp_path: Path) -> Iterator[CliNode]:
    wrapper = tmp_path / "python399.py"
    wrapper.write_text(WRAPPER)
    with running_node(
        tmp_path / "old",
        secret=SECRET,
        name="other-python",
        cpus=2,
        launcher=[sys.executable, str(wrapper)],
    ) as node:
        yield node


@pytest.fixture
def same_python(tmp_path: Path) -> Iterator[CliNode]:
    with running_node(
        tmp_path / "same", secret=SECRET, name="same-python", cpus=1
    ) as node:
        yield node


def scheduler_of(tmp_path: Path, *nodes: CliNode) -> SchedulerProcess:
    return SchedulerProcess(tmp_path, [node.spec for node in nodes], SECRET)


def test_jobs_of_compiled_code_go_only_to_nodes_of_the_clients_python(
    tmp_path: Path,
    users: dict[str, Path],
    other_python: CliNode,
    same_python: CliNode,
) -> None:
    sched = scheduler_of(tmp_path, other_python, same_python).start()
    try:
        with SharedJobCluster(
            node_name,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
        ) as cluster:
            jobs = [cluster.submit(i) for i in range(8)]
            assert cluster.wait(timeout=WAIT)
        assert {job.result for job in jobs} == {"same-python"}, [
            (job.status, job.result, job.exception) for job in jobs
        ]
        sched.wait_for_log("runs Python 3.99.0")
    finally:
        sched.stop()


def test_a_scheduler_with_only_nodes_of_another_python_refuses_compiled_code(
    tmp_path: Path, users: dict[str, Path], other_python: CliNode
) -> None:
    ours = "{}.{}".format(*sys.version_info[:2])
    sched = scheduler_of(tmp_path, other_python).start()
    try:
        with pytest.raises(SetupError) as raised:
            SharedJobCluster(
                node_name,
                scheduler_host=sched.address,
                secret_file=str(users["alice"]),
            )
        message = str(raised.value)
        assert "runs Python 3.99.0" in message, message
        assert f"Python {ours}" in message, message
    finally:
        sched.stop()
