"""A node on another Python version than the client's, as in a lab whose nodes run
an older distribution: dispy sent computations as source text, which any Python 3
ran; dispynb sends a function of the script as compiled code, which only the Python
version (major.minor) that compiled it runs. Such a node is refused with the reason
and the fix, before any job runs on it; what travels by name (a function of an
installed module, a program) runs there as before.

The node is a real ``dispynb-node`` whose ``platform.python_version()`` says 3.99.0
(a wrapper sets it before the node starts), on 127.0.0.1.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster, NodeAllocate
from dispynb.errors import SetupError
from tests.nodeproc import CliNode, running_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

#: Runs ``python -m nodeserver ARGS`` (its arguments) with another Python version
#: announced: the node says what platform.python_version() says.
WRAPPER = """
import platform, runpy, sys
platform.python_version = lambda: "3.99.0"
sys.argv = ["nodeserver", *sys.argv[4:]]
runpy.run_module("nodeserver", run_name="__main__", alter_sys=True)
"""


def square(x: int) -> int:
    return x * x


@pytest.fixture
def other_python(tmp_path: Path) -> Iterator[CliNode]:
    wrapper = tmp_path / "python399.py"
    wrapper.write_text(WRAPPER)
    with running_node(
        tmp_path / "node", launcher=[sys.executable, str(wrapper)]
    ) as node:
        yield node


def test_a_function_of_the_program_is_refused_by_a_node_on_another_python(
    other_python: CliNode,
) -> None:
    ours = "{}.{}".format(*sys.version_info[:2])
    with pytest.raises(SetupError) as raised:
        JobCluster(square, nodes=[other_python.spec], secret=other_python.secret)
    message = str(raised.value)
    assert message.startswith(
        "node 'cli-node' (127.0.0.1) runs Python 3.99.0 and this client Python "
        f"{ours}: the computation square, defined in this program, travels as "
        "compiled code"
    ), message
    assert message.endswith(
        f"(start dispynb-node with a Python {ours}, or run this program with "
        "Python 3.99)"
    ), message


def test_what_travels_by_name_runs_on_a_node_on_another_python(
    other_python: CliNode,
) -> None:
    cluster = JobCluster(
        math.factorial, nodes=[other_python.spec], secret=other_python.secret
    )
    try:
        job = cluster.submit(5)
        assert job() == 120 and job.status == DispyJob.Finished
    finally:
        cluster.close()


class Scale:
    """A class of the program: an instance of it in ``depends`` sends the class,
    compiled."""

    def __init__(self, factor: int) -> None:
        self.factor = factor


def test_an_instance_of_a_program_class_in_depends_is_refused_by_another_python(
    other_python: CliNode,
) -> None:
    with pytest.raises(SetupError) as raised:
        JobCluster(
            math.factorial,
            depends=[Scale(2)],
            nodes=[other_python.spec],
            secret=other_python.secret,
        )
    assert "runs Python 3.99.0" in str(raised.value)
    assert "Scale (depends), defined in this program" in str(raised.value)


class ScalingNodes(NodeAllocate):
    """Gives each node its own ``depends`` (as dispy's node_setup example does):
    here an instance of a program class, which sends the class compiled."""

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):  # type: ignore[no-untyped-def]
        self.depends = [Scale(2)]
        return cpus


def test_per_node_depends_of_compiled_code_are_refused_by_another_python(
    other_python: CliNode,
) -> None:
    """The computation travels by name, the node's own depends (set by allocate)
    compiled: refused as the computation's depends are (before: sent, to fail
    as a node really on another Python loaded them)."""
    host, port = other_python.spec.rsplit(":", 1)
    with pytest.raises(SetupError) as raised:
        JobCluster(
            math.factorial,
            nodes=[ScalingNodes(host, port=int(port))],
            secret=other_python.secret,
        )
    assert "runs Python 3.99.0" in str(raised.value)
    assert "Scale (depends), defined in this program" in str(raised.value)
