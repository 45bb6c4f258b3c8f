"""A script's computation that reads a global the script sets only after
``JobCluster()`` (a computation takes the globals it uses as they are when the cluster
sends it): the job's ``NameError`` says so, and what to do, instead of leaving the
user to wonder why a name their script defines "is not defined"."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import LocalCluster
from tests.api.test_script_tracebacks import _run_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SCRIPT = """\
import dispynb as dispy
from os import environ


def compute(n):
    return n * {name}


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=environ["NODES"].split(","))
    {late}
    job = cluster.submit(4)
    job()
    print(job.exception, end="")
    cluster.close()
"""


def test_a_global_set_after_jobcluster_is_named_with_the_fix(
    local: LocalCluster, tmp_path: Path
):
    (tmp_path / "script.py").write_text(SCRIPT.format(name="SCALE", late="SCALE = 10"))
    proc = _run_script(local, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").splitlines()
    assert lines[-2] == "NameError: name 'SCALE' is not defined", proc.stdout
    advice = lines[-1]
    assert "SCALE is a global of this program now" in advice, advice
    assert "when JobCluster() sent compute" in advice, advice
    assert "set SCALE before JobCluster()" in advice, advice
    assert "argument" in advice, advice


def test_a_name_the_program_never_defines_gets_no_advice(
    local: LocalCluster, tmp_path: Path
):
    (tmp_path / "script.py").write_text(SCRIPT.format(name="NOWHERE", late="pass"))
    proc = _run_script(local, tmp_path)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.rstrip("\n").splitlines()[-1]
    assert last == "NameError: name 'NOWHERE' is not defined", proc.stdout
