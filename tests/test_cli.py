"""Tests of the ``dispynb`` command line (`dispynb.cli`)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dispynb import __version__
from dispynb.cli import ProgressLine, estimate_pi, main
from tests.sigint import flag_when

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"dispynb {__version__}\n"


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dispynb {__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--jobs", "0"], "argument --jobs: must be at least 1, got 0"),
        (["demo", "--nodes", "two"], "argument --nodes: not an integer: 'two'"),
    ],
)
def test_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dispynb")
    assert message in err


def test_import_is_light() -> None:
    """Importing the CLI (as a node does to unpickle estimate_pi) loads no client."""
    code = (
        "import sys, dispynb.cli; "
        "print(sorted(m for m in sys.modules if m.startswith("
        "('dispynb', 'tornado', 'cloudpickle', 'msgpack', 'psutil'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    # dispynb._joblibhook: joblib's "dispynb" backend name, registered without
    # importing joblib (a finder on sys.meta_path; no client, no third party);
    # dispynb._check_python: stops a Python older than 3.11, saying so.
    assert out.strip() == (
        "['dispynb', 'dispynb._check_python', 'dispynb._joblibhook', "
        "'dispynb._version', 'dispynb.cli']"
    )


def test_estimate_pi_is_deterministic() -> None:
    hits, node = estimate_pi(7, 20_000)
    assert estimate_pi(7, 20_000)[0] == hits
    assert abs(4 * hits / 20_000 - 3.1416) < 0.1
    assert isinstance(node, str) and node


def test_progress_line_counts_each_final_job_once() -> None:
    stream = io.StringIO()
    progress = ProgressLine(40, stream=stream, interval=0.0)
    progress.start()

    def report(first: int) -> None:
        for i in range(first, first + 10):
            progress.job_status(SimpleNamespace(id=i, status=7))  # provisional
            progress.job_status(SimpleNamespace(id=i, status=11 if i % 10 else 9))
            progress.job_status(SimpleNamespace(id=i, status=11))  # duplicate

    threads = [threading.Thread(target=report, args=(k * 10,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert progress.finished.is_set()
    progress.close()
    progress.close()
    last = stream.getvalue().split("\r")[-1]
    assert re.fullmatch(r"\[#{30}\] 40/40 jobs  \d+\.\d jobs/s  4 failed\n", last)


def test_progress_line_says_cancelled_jobs_are_cancelled_not_failed() -> None:
    """Ctrl-C in the demo cancels its queued jobs: the line drawn then said
    them failed, and counted them in the rate as jobs run."""
    stream = io.StringIO()
    progress = ProgressLine(4, stream=stream, interval=0.0)
    progress._started -= 1.0  # one second ago: the rate is the jobs that ran
    for i, status in enumerate((11, 9, 8, 8)):  # finished, terminated, cancelled
        progress.job_status(SimpleNamespace(id=i, status=status))
    progress.close()
    last = stream.getvalue().split("\r")[-1]
    assert re.fullmatch(
        r"\[#{30}\] 4/4 jobs  [12]\.\d jobs/s  1 failed  2 cancelled\n", last
    ), last


def test_ctrl_c_ends_the_demos_wait_for_its_progress_line_at_once() -> None:
    """The demo's main thread waits for the progress line's last callback; an
    interrupt that only sets Python's flag (an IDE's or a debugger's,
    ``_thread.interrupt_main()``) ends that wait at once, as every wait of
    dispynb's: it waited out its timeout (5 s in the demo) on a threading.Event."""
    progress = ProgressLine(1, stream=io.StringIO())
    main = threading.main_thread().ident

    def waiting() -> bool:  # inside progress.finished.wait, whatever it is
        frame = sys._current_frames().get(main or 0)
        while frame is not None:
            if frame.f_locals.get("self") is progress.finished:
                return True
            frame = frame.f_back
        return False

    started = time.monotonic()
    with flag_when(waiting), pytest.raises(KeyboardInterrupt):
        progress.finished.wait(timeout=30.0)
    assert time.monotonic() - started < 5.0
    assert not progress.finished.is_set()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo_runs_on_local_nodes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dispynb.cli", "demo", "--jobs", "8", "--cpus", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    match = re.search(r"pi ~= (\d\.\d+)", proc.stdout)
    assert match, proc.stdout
    assert abs(float(match.group(1)) - 3.14159) < 0.05
    assert "8/8 jobs" in proc.stderr
    # print_status()'s table, with dispy's column names.
    assert re.search(r"Node.*CPUs.*Jobs", proc.stdout), proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_python_m_dispynb_is_the_dispynb_command(tmp_path: Path) -> None:
    """Users type ``python -m dispynb ...`` where the venv's scripts are not on
    PATH: it was 'No module named dispynb.__main__'. It is the ``dispynb``
    command, its demo included (estimate_pi unpickled on the nodes)."""

    def dispynb(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dispynb", *args],
            cwd=tmp_path,  # the installed dispynb, not a checkout's directory
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    version = dispynb("version")
    assert (version.returncode, version.stdout) == (0, f"dispynb {__version__}\n")
    usage = dispynb()
    assert usage.returncode == 2 and usage.stderr.startswith("usage: dispynb ")
    demo = dispynb("demo", "--nodes", "1", "--jobs", "4", "--samples", "1000")
    assert demo.returncode == 0, demo.stderr
    assert "4/4 jobs" in demo.stderr and "pi ~= " in demo.stdout


def test_progress_line_into_a_file_writes_only_its_final_count() -> None:
    """``dispynb demo > log`` (CI, a pipe): redrawing in place with ``\\r`` filled
    the file with every intermediate count on one line; it gets the last only."""
    stream = io.StringIO()  # no terminal
    progress = ProgressLine(40, stream=stream, interval=0.0)
    progress.start()
    for i in range(40):
        progress.job_status(SimpleNamespace(id=i, status=11))
    progress.close()
    assert re.fullmatch(r"\r\[#{30}\] 40/40 jobs  \d+\.\d jobs/s\n", stream.getvalue())


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_on_a_terminal_is_redrawn_as_jobs_end() -> None:
    stream = _Terminal()
    progress = ProgressLine(4, stream=stream, interval=0.0)
    progress.start()
    for i in range(4):
        progress.job_status(SimpleNamespace(id=i, status=11))
    progress.close()
    frames = stream.getvalue().split("\r")[1:]
    assert [frame.split(" jobs")[0][-3:] for frame in frames] == [
        "0/4",
        "1/4",
        "2/4",
        "3/4",
        "4/4",
    ], frames
