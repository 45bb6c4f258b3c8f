"""The leak check every test runs (`tests/conftest.py`): what it counts as left open."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import conftest


def test_an_engines_socket_stays_allowed_while_another_closes_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `allow_engine_sockets` (Ray's driver), a socket of the engine's that
    stays open is not a leak, also when another one closes between the check's
    listing and its look at it (Ray's threads close the connections of the actors
    a cluster ended): before, the descriptor that closed meanwhile made the check
    wait for the rest without the allowance, and it reported the socket that stayed
    (tests/backends/test_ray.py in CI: "descriptors left open: 43 -> socket:[...]").
    """
    before = conftest._open_fds()
    with socket.socket() as stays:
        closing = socket.socket()
        closing_fd = closing.fileno()
        readlink = os.readlink

        def look(path: str) -> str:
            if path == f"/proc/self/fd/{closing_fd}" and closing.fileno() != -1:
                closing.close()  # closed by another thread just now
            return readlink(path)

        monkeypatch.setattr(os, "readlink", look)
        deadline = time.monotonic() + 3.0
        assert conftest.fds_left_open(before, True, deadline) == []
        monkeypatch.undo()
        assert closing.fileno() == -1
        # Not allowed: the socket that stays is a leak.
        left = conftest.fds_left_open(before, False, time.monotonic())
        assert left == [
            f"{stays.fileno()} -> {os.readlink(f'/proc/self/fd/{stays.fileno()}')}"
        ]


def test_a_file_left_open_is_a_leak_even_with_the_engines_allowance(
    tmp_path: Path,
) -> None:
    before = conftest._open_fds()
    with open(tmp_path / "left", "w") as handle:
        left = conftest.fds_left_open(before, True, time.monotonic())
        assert left == [f"{handle.fileno()} -> {tmp_path / 'left'}"]
    assert conftest.fds_left_open(before, True, time.monotonic()) == []


#: A pytest run's tests, in a directory of their own with the checks of
#: tests/conftest.py: the first returns while another run (`OTHER_RUN`) has a
#: recovery file in the directory; the second leaves one of its own.
RUN = """
import pathlib
import time

from dispynb.clusterjournal import acquire_default_journal


def test_a_file_of_another_run_is_not_this_runs():
    pathlib.Path("go").touch()
    deadline = time.monotonic() + 20
    while not pathlib.Path("made").exists():
        assert time.monotonic() < deadline, "the other run made no file"
        time.sleep(0.01)


def test_this_runs_own_file_is_still_found():
    acquire_default_journal().close(remove=False)  # left behind, as by a crash
"""

#: The other run: a process of the same directory, not started by that pytest,
#: holding its default recovery file while the first test runs; it prints whether
#: its file was still there when it was done with it.
OTHER_RUN = """
import pathlib
import sys
import time

from dispynb.clusterjournal import acquire_default_journal


def wait(name):
    deadline = time.monotonic() + 30
    while not pathlib.Path(name).exists():
        assert time.monotonic() < deadline, name
        time.sleep(0.01)


wait("go")
journal = acquire_default_journal()
pathlib.Path("made").touch()
wait("done")
print(pathlib.Path(journal.path).exists())
journal.close(remove=True)
"""


@pytest.mark.timeout(120)
def test_two_runs_in_one_directory_leave_each_others_recovery_files_alone(
    tmp_path: Path,
) -> None:
    """Two pytest runs from one checkout: a recovery file of the other's (its
    clusters make them in the directory all the time) failed a test of this one,
    which removed it from under the other. Now only this run's own counts."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    (tmp_path / "test_run.py").write_text(RUN)
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_RUN],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA"]
        run = subprocess.run(
            [*command, "-p", "tests.conftest", "test_run.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        (tmp_path / "done").touch()
        still_there, _ = other.communicate(timeout=30)
    assert other.returncode == 0
    assert still_there == "True\n"  # not removed by the run that was not its own
    # The check fails a test at its teardown (an ERROR): the second test only.
    summary = run.stdout.split(" short test summary info ")[-1]
    assert "ERROR test_run.py::test_a_file_of_another" not in summary, run.stdout
    assert "ERROR test_run.py::test_this_runs_own_file" in summary, run.stdout
    assert (
        "test_run.py::test_this_runs_own_file_is_still_found left recovery files"
        in run.stdout
    ), run.stdout
    assert not list(tmp_path.glob("_dispy_*"))
