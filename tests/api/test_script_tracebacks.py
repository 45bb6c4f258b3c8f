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
from dispynb.tracebacks import client_file_names, explain_missing_module

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


def _run_script(
    local: LocalCluster, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``tmp_path/script.py`` as a person runs it, from its directory, with the
    local node's specs in ``$NODES`` and its secret in the environment."""
    env = {
        k: v for k, v in os.environ.items() if k not in (SECRET_ENV, SECRET_FILE_ENV)
    }
    env[SECRET_ENV] = local.secret
    env["NODES"] = ",".join(local.node_specs())
    return subprocess.run(
        [sys.executable, "script.py"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_scripts_remote_traceback_shows_its_file_and_lines(
    local: LocalCluster, tmp_path: Path
):
    (tmp_path / "script.py").write_text(SCRIPT)
    proc = _run_script(local, tmp_path)
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


DEPENDS_SCRIPT = """\
import dispynb as dispy
import units
from os import environ


def compute(n):
    import helpers
    return helpers.scale(n)


if __name__ == "__main__":
    cluster = dispy.JobCluster(
        compute, nodes=environ["NODES"].split(","), depends=["helpers.py", units]
    )
    job = cluster.submit(-1)
    job()
    print(job.exception, end="")
    cluster.close()
"""


def test_frames_of_the_files_sent_name_them_here_not_on_the_node(
    local: LocalCluster, tmp_path: Path
):
    """A job failing in a module sent with ``depends`` (a file, a module): its
    frames name the script's files, as a local traceback would, not their copies in
    the node's directory (dispy showed the node's paths, which the user cannot open
    here)."""
    (tmp_path / "script.py").write_text(DEPENDS_SCRIPT)
    (tmp_path / "helpers.py").write_text(
        "import units\n\n\ndef scale(x):\n    return units.check(x) * 2\n"
    )
    (tmp_path / "units.py").write_text(
        "def check(x):\n    if x < 0:\n        raise ValueError(x)\n    return x\n"
    )
    proc = _run_script(local, tmp_path)
    assert proc.returncode == 0, proc.stderr
    frames = [line for line in proc.stdout.splitlines() if "File " in line]
    assert frames == [
        f'  File "{tmp_path / "script.py"}", line 8, in compute',
        f'  File "{tmp_path / "helpers.py"}", line 5, in scale',
        f'  File "{tmp_path / "units.py"}", line 3, in check',
    ], proc.stdout
    assert "    raise ValueError(x)\nValueError: -1\n" in proc.stdout


def test_a_file_changed_since_it_was_sent_keeps_the_nodes_name(tmp_path: Path):
    """Only a frame whose source line is that line of the file here is renamed: a
    file edited since it was sent is not shown with lines it no longer has."""
    (tmp_path / "helpers.py").write_text("def scale(x):\n    return x * 3\n")
    remote = (
        "Traceback (most recent call last):\n"
        '  File "/node/dest/c-1/helpers.py", line 2, in scale\n'
        "    return x / 0\n"
        "ZeroDivisionError: division by zero\n"
    )
    files = [("helpers.py", str(tmp_path / "helpers.py"))]
    assert client_file_names(remote, files) == remote
    renamed = remote.replace("x / 0", "x * 3")
    assert client_file_names(renamed, files) == renamed.replace(
        "/node/dest/c-1/helpers.py", str(tmp_path / "helpers.py")
    )


MISSING_MODULE_SCRIPT = """\
import dispynb as dispy
from os import environ


def compute(n):
    import mymodel
    return mymodel.scale(n)


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=environ["NODES"].split(","))
    jobs = [cluster.submit(1), cluster.submit(2)]
    cluster.wait()
    print(jobs[0].status == dispy.DispyJob.Terminated, jobs[1].status)
    print(jobs[0].exception, end="")
    cluster.close()
"""


def test_a_module_beside_the_script_missing_on_the_node_says_to_send_it(
    local: LocalCluster, tmp_path: Path
):
    """A job importing a module the script's directory has and the node has not (a
    first-hour mistake): its traceback ends with how to send it, ``depends``."""
    (tmp_path / "script.py").write_text(MISSING_MODULE_SCRIPT)
    (tmp_path / "mymodel.py").write_text("def scale(x):\n    return 3 * x\n")
    proc = _run_script(local, tmp_path)
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "script.py"
    assert proc.stdout == (
        "True 9\n"
        "Traceback (most recent call last):\n"
        f'  File "{script}", line 6, in compute\n'
        "    import mymodel\n"
        "ModuleNotFoundError: No module named 'mymodel'\n"
        f"(this client imports 'mymodel' from {tmp_path / 'mymodel.py'}, the node "
        "cannot: send it with JobCluster(..., depends=[mymodel]), or install it on "
        "the node)\n"
    ), proc.stdout


WRONG_CALL_SCRIPT = """\
import dispynb as dispy
from os import environ


def area(width, height):
    return width * height


if __name__ == "__main__":
    cluster = dispy.JobCluster(area, nodes=environ["NODES"].split(","))
    jobs = [cluster.submit(3), cluster.submit(3, 4)]
    cluster.wait()
    print(jobs[1].result)
    print(jobs[0].exception, end="")
    cluster.close()
"""


def test_a_job_submitted_with_the_wrong_arguments_shows_the_call(
    local: LocalCluster, tmp_path: Path
):
    """``submit(3)`` for ``area(width, height)``: the job's error shows what the job
    was called with and what the function takes, as a local traceback shows the
    calling line; the other job is unaffected."""
    (tmp_path / "script.py").write_text(WRONG_CALL_SCRIPT)
    proc = _run_script(local, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "12\n"
        "TypeError: area() missing 1 required positional argument: 'height'\n"
        "(the job called area(3); area takes (width, height): give submit() the "
        "function's arguments)\n"
    ), proc.stdout


def test_a_package_missing_on_the_node_is_to_be_installed_not_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``depends`` sends one file: for a package (or an extension module) the node
    lacks, the advice is to install it there."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "single.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    package = explain_missing_module(
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "ModuleNotFoundError: No module named 'mypkg.sub'\n"
    )
    assert package.endswith(
        f"(this client imports 'mypkg' from {tmp_path / 'mypkg' / '__init__.py'}, "
        "the node cannot: install it on the node)\n"
    ), package
    single = explain_missing_module("ModuleNotFoundError: No module named 'single'\n")
    assert single.endswith("depends=[single]), or install it on the node)\n"), single
    missing = "ModuleNotFoundError: No module named 'not_here_either_9f2'\n"
    assert explain_missing_module(missing) == missing


OWN_MODULES_SCRIPT = """\
import traceback
from os import environ

import dispynb as dispy
from mylib import compute

if __name__ == "__main__":
    try:
        cluster = dispy.JobCluster(compute, nodes=environ["NODES"].split(","))
        job = cluster.submit(2)
        result = job()
        print(result if job.exception is None else job.exception, end="")
        cluster.close()
    except dispy.errors.SetupError as exc:
        print("".join(traceback.format_exception_only(exc)), end="")
"""


def test_a_computation_whose_module_imports_another_of_the_scripts_says_to_send_it(
    local: LocalCluster, tmp_path: Path
):
    """The computation comes from ``mylib.py`` beside the script (sent by value),
    which imports ``helpers.py`` from there too, in its function (by name when
    the job runs: the node cannot): the job's error ends with how to send it.
    (A module that ``mylib`` imports at its top travels by value with it.)"""
    (tmp_path / "script.py").write_text(OWN_MODULES_SCRIPT)
    (tmp_path / "mylib.py").write_text(
        "def compute(x):\n    import helpers\n\n    return helpers.double(x)\n"
    )
    (tmp_path / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    proc = _run_script(local, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "No module named 'helpers'" in proc.stdout, proc.stdout
    assert proc.stdout.endswith(
        f"(this client imports 'helpers' from {tmp_path / 'helpers.py'}, the node "
        "cannot: send it with JobCluster(..., depends=[helpers]), or install it on "
        "the node)\n"
    ), proc.stdout
