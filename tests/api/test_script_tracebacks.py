"""A script's `JobCluster` job that raises: its ``job.exception`` names the script's
file, line and source line, as a local traceback does, not ``File "<dynamic-code>"``
(code sent by value travels without its file name)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster
from dispynb.defaults import SECRET_ENV, SECRET_FILE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SCRIPT = """\
import dispynb as dispy
from os import environ


def ratio(x):
    return 10 / x


def compute(n):
    scaled = n - 1
    return ratio(scaled)


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=environ["NODES"].split(","))
    job = cluster.submit(1)
    job()
    print(job.exception, end="")
    cluster.close()
"""


@pytest.fixture(scope="module")
def local() -> Iterator[LocalCluster]:
    with LocalCluster(nodes=1, cpus=1) as cluster:
        yield cluster


def test_a_scripts_remote_traceback_shows_its_file_and_lines(
    local: LocalCluster, tmp_path: Path
):
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {
        k: v for k, v in os.environ.items() if k not in (SECRET_ENV, SECRET_FILE_ENV)
    }
    env[SECRET_ENV] = local.secret
    env["NODES"] = ",".join(local.node_specs())
    proc = subprocess.run(
        [sys.executable, "script.py"],  # as a person runs it, from its directory
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "script.py"
    assert proc.stdout == (
        "Traceback (most recent call last):\n"
        f'  File "{script}", line 11, in compute\n'
        "    return ratio(scaled)\n"
        f'  File "{script}", line 6, in ratio\n'
        "    return 10 / x\n"
        "ZeroDivisionError: division by zero\n"
    ), proc.stdout
