"""`dispynb.jobenv`: what every engine's workers give a computation, the same way."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dispynb.jobenv import (
    DISPY_MODULES,
    JOB_ENDED,
    file_sent,
    format_job_exception,
    implicit_modules,
    setup_failure,
)


@pytest.mark.parametrize("result", [None, 0, 1, 2])
def test_setup_success_values(result: object) -> None:
    assert setup_failure(result) is None


@pytest.mark.parametrize(
    ("result", "shown"), [(-1, "-1"), ("x" * 200, "..."), ("no", "'no'")]
)
def test_setup_failure_names_what_setup_returned(result: object, shown: str) -> None:
    message = setup_failure(result)
    assert message is not None and shown in message
    assert "success is None, 0, 1 or 2" in message and len(message) < 160


def _runner(function: object) -> str:
    try:
        function()  # type: ignore[operator]
    except BaseException as exc:
        return format_job_exception(exc)
    return ""


def test_job_exception_shows_the_job_not_the_runner() -> None:
    def job() -> None:
        raise ValueError("bad input")

    text = _runner(job)
    assert "ValueError: bad input" in text and "in job" in text
    assert "_runner" not in text


def test_sys_exit_in_a_job_is_named() -> None:
    text = _runner(lambda: sys.exit(3))
    assert text.endswith("SystemExit: the job called sys.exit(3)\n")


def test_implicit_modules_are_dispys() -> None:
    modules = implicit_modules()
    assert set(modules) == set(DISPY_MODULES)
    assert modules["os"].__name__ == "os"


def test_limit_memory_applies_and_restores() -> None:
    """In a child process (the limit is process-wide): a large allocation fails
    under the limit, works again after the limits are restored."""
    code = (
        "import resource\n"
        "from dispynb.jobenv import limit_memory\n"
        "vms = int(open('/proc/self/statm').read().split()[0]) * 4096\n"
        "saved = limit_memory(vms + 64 * 2**20)\n"
        "try:\n"
        "    bytearray(512 * 2**20)\n"
        "    print('no limit')\n"
        "except MemoryError:\n"
        "    print('limited')\n"
        "resource.setrlimit(resource.RLIMIT_AS, saved)\n"
        "print(len(bytearray(256 * 2**20)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["limited", str(256 * 2**20)]


def test_a_file_whose_job_returned_before_its_answer_is_not_confirmed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A thread whose job returned while it waited for the client's answer sent
    the file: the line said 'not sent' and then that the file may still arrive.
    It says the file is not confirmed, why, and what to do."""
    assert file_sent("late.txt", JOB_ENDED) == -1
    line = capsys.readouterr().err
    assert line.startswith("dispy_send_file: 'late.txt' not confirmed: "), line
    assert "not sent" not in line and "may still arrive" not in line, line
    assert "the job returned while a thread it started waited" in line, line
    assert "wait for (join) the threads that send files" in line, line
