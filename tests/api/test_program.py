"""Program computations: a path (or a name on PATH) instead of a Python function."""

from __future__ import annotations

import os
import stat
import time

import pytest

from dispynb import DispyJob, JobCluster
from tests.jobs import WAIT, wait_for_path, wait_until

pytestmark = pytest.mark.slow

SHELL_PROGRAM = """#!/bin/sh
echo "args: $*"
echo "node: $dispy_node_name"
echo "on stderr" >&2
exit "$2"
"""


def _write_program(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_program_shell_script_result_is_exit_code_and_output_is_bytes(local, tmp_path):
    program = _write_program(tmp_path / "report.sh", SHELL_PROGRAM)
    with JobCluster(str(program), nodes=local) as cluster:
        assert cluster.name == "report.sh"
        jobs = [cluster.submit("x", code) for code in (0, 3)]
        assert cluster.wait(timeout=WAIT)
    for job, code in zip(jobs, (0, 3), strict=True):
        assert job.status == DispyJob.Finished  # a non-zero exit is still Finished
        assert job.result == code
        assert job.stdout == f"args: x {code}\nnode: local-0\n".encode()
        assert job.stderr == b"on stderr\n"


def test_program_python_file_runs_with_node_python(local, tmp_path):
    program = tmp_path / "square.py"
    program.write_text(
        "import os, sys\n"
        "print(int(sys.argv[1]) ** 2)\n"
        "print(os.path.basename(os.environ['dispy_job_path']) != '')\n"
    )
    with JobCluster(str(program), nodes=local) as cluster:
        job = cluster.submit(12)
        assert job.wait(timeout=WAIT)
    assert job.status == DispyJob.Finished
    assert job.result == 0
    assert job.stdout == b"144\nTrue\n"


def test_program_name_found_on_path(local, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_program(bindir / "greet-dispynb", "#!/bin/sh\necho hi $1\n")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    with JobCluster("greet-dispynb", nodes=local) as cluster:
        job = cluster.submit("there")
        assert job.wait(timeout=WAIT)
    assert job.stdout == b"hi there\n"


def test_program_cancel_running_program_stops_it(local1, tmp_path):
    marker = tmp_path / "started"
    program = _write_program(
        tmp_path / "slow.sh",
        f'#!/bin/sh\nsleep 60 &\necho $! > "{marker}"\nwait\n',
    )
    with JobCluster(str(program), nodes=local1) as cluster:
        job = cluster.submit()
        wait_for_path(marker)
        # The shell creates the file, then writes the pid: wait for the line.
        wait_until(lambda: marker.read_text().endswith("\n"))
        child = int(marker.read_text())
        assert cluster.cancel(job) == 0
        assert job.wait(timeout=10)
        assert job.status == DispyJob.Terminated
    # What the program started is gone too, not only its worker.
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie counts as gone
        return handle.read().split()[2] != "Z"
