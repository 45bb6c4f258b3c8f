"""``dispynb run``: dispy's ``dispy_cmd.py`` command line, against a real node.

A lab's script ran ``dispy_cmd.py -f FILE -a "ARGS" -a "ARGS" PROGRAM``; the same
options given to ``dispynb run`` run the program on the node once per ``-a`` and
report each run. The node is a ``dispynb-node`` process on 127.0.0.1.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeproc import CliNode, node_env, running_node
from tests.ports import PortHolder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

#: A program as a lab writes them: reads a file sent with it, prints its
#: arguments, complains on stderr, exits with its second argument.
PROGRAM = """#!/bin/sh
echo "$1 $(cat data.txt)"
echo "note about $1" >&2
exit ${2:-0}
"""


def dispynb_run(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispynb.cli", "run", *argv],
        cwd=cwd,
        env=node_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[CliNode]:
    with running_node(tmp_path / "node", cpus=2) as node:
        yield node


def test_dispy_cmd_options_run_the_program_once_per_a(
    tmp_path: Path, node: CliNode
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    program = work / "count.sh"
    program.write_text(PROGRAM)
    program.chmod(0o755)
    (work / "data.txt").write_text("from data.txt\n")
    done = dispynb_run(
        work,
        "-n", node.spec, "--secret-file", str(node.secret_file),
        "-f", "data.txt", "-a", "alpha 0", "-a", "beta 3", "-a", "gamma",
        "count.sh",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line]
    expected = []
    for n, (word, code) in enumerate([("alpha", 0), ("beta", 3), ("gamma", 0)], 1):
        arguments = f"{word} {code}" if word != "gamma" else word
        expected += [
            f"job {n} ({arguments}): exit code {code}",
            "  stdout:",
            f"    {word} from data.txt",
            "  stderr:",
            f"    note about {word}",
        ]
    assert lines[: len(expected)] == expected, done.stdout
    # then the nodes' status, as cluster.print_status() prints it
    assert re.search(r"^ +cli-node \| +2 \| +3 \|", done.stdout, re.M), done.stdout
    assert lines[-1].startswith("Total job time:"), done.stdout
    assert list(work.glob("_dispy_*")) == []  # no recovery journal left behind


def test_a_node_that_is_not_there_is_said_in_one_line_with_exit_1(
    tmp_path: Path, held_port: PortHolder
) -> None:
    spec = f"127.0.0.1:{held_port()}"  # nothing listens there
    done = dispynb_run(tmp_path, "-n", spec, "-a", "x", "true")
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"dispynb run: error: cannot connect to {spec}"), last
    assert "Traceback" not in done.stderr
