"""A script's computation that reads a global the script sets only after
``JobCluster()`` (a computation takes the globals it uses as they are when the cluster
sends it): the job's ``NameError`` says so, and what to do, instead of leaving the
user to wonder why a name their script defines "is not defined"."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import LocalCluster
from tests.api.test_script_tracebacks import _run_script
from tests.logged import logged_messages

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def run(local: LocalCluster, tmp_path: Path, script: str) -> tuple[str, str]:
    """Save ``script`` as script.py and run it on ``local``: its stdout and stderr,
    once it succeeded."""
    (tmp_path / "script.py").write_text(script)
    proc = _run_script(local, tmp_path)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


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
    out, err = run(local, tmp_path, SCRIPT.format(name="SCALE", late="SCALE = 10"))
    # submit warned before: a warning that the jobs fail, not of a stale value.
    assert "SCALE, which was not defined when JobCluster() sent compute" in err, err
    assert "its jobs do not have it (NameError)" in err, err
    lines = out.rstrip("\n").splitlines()
    assert lines[-2] == "NameError: name 'SCALE' is not defined", out
    advice = lines[-1]
    assert "SCALE is a global of this program now" in advice, advice
    assert "when JobCluster() sent compute" in advice, advice
    assert "set SCALE before JobCluster()" in advice, advice
    assert "argument" in advice, advice


def test_a_name_the_program_never_defines_gets_no_advice(
    local: LocalCluster, tmp_path: Path
):
    out, err = run(local, tmp_path, SCRIPT.format(name="NOWHERE", late="pass"))
    last = out.rstrip("\n").splitlines()[-1]
    assert last == "NameError: name 'NOWHERE' is not defined", out
    # Never defined here: nothing to warn of at submit, no advice with the error.
    # (job() warns once that it returns None for a failed job: that line only.)
    assert "when JobCluster() sent" not in err, err
    assert "global of this program" not in out, out
    mentions = [line for line in logged_messages(err) if "NOWHERE" in line]
    assert mentions and all(line.startswith("job 1 ended ") for line in mentions), err


REBOUND = """\
import dispynb as dispy
from os import environ

SCALE = 1


def compute(n):
    return n * SCALE


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=environ["NODES"].split(","))
    jobs = []
    for SCALE in (2, 3):  # the jobs still see SCALE = 1
        jobs.append(cluster.submit(4))
    print([job() for job in jobs])
    cluster.close()
"""


def test_a_global_rebound_after_jobcluster_is_warned_of_once_at_submit(
    local: LocalCluster, tmp_path: Path
):
    out, err = run(local, tmp_path, REBOUND)
    assert out == "[4, 4]\n"  # what the warning is about
    warned = [line for line in err.splitlines() if "SCALE" in line]
    assert len(warned) == 1, err
    assert "compute reads the global SCALE, which had another value" in warned[0]
    assert "pass it to submit as an argument" in warned[0]


SETUP_GLOBAL = """\
import dispynb as dispy
from os import environ


def setup():
    global data
    data = [1, 2, 3]
    return 0


def compute(n):
    return data[n]


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, setup=setup, nodes=environ["NODES"].split(","))
    data = "the client's own, unrelated"
    print(cluster.submit(1)())
    cluster.close()
"""


def test_a_global_that_setup_sets_on_the_node_is_not_warned_of(
    local: LocalCluster, tmp_path: Path
):
    # dispy's node_setup idiom: setup makes the global the jobs read, on the node.
    out, err = run(local, tmp_path, SETUP_GLOBAL)
    assert out == "2\n"
    assert "data" not in err, err
