"""dispynb on a Python older than 3.11 (a checkout on ``PYTHONPATH``, a node of a
shared home directory whose ``python3`` is 3.10): it stopped with ``ImportError:
cannot import name 'Self' from 'typing'`` deep in the protocol; it now says which
Python it needs and which one ran it, whichever program was started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Python 3.10 as this interpreter pretends to be it, then runs ``sys.argv[1:]`` as
#: ``python -m MODULE ARGS`` or ``python -c CODE`` would.
AS_310 = """
import runpy, sys
sys.version_info = (3, 10, 13, "final", 0)
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    exec(sys.argv[2])
"""

PROGRAMS = [
    ["-c", "import dispynb"],
    ["-m", "nodeserver", "--help"],
    ["-m", "schedserver", "--help"],
    ["-m", "dispynb", "demo", "--help"],
]


def _said(command: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT.parent
    )
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("program", PROGRAMS, ids=" ".join)
def test_an_older_python_is_told_which_python_dispynb_needs(program: list[str]) -> None:
    said = _said([sys.executable, "-c", AS_310, *program])
    assert said == (
        f"ImportError: dispynb needs Python 3.11 or newer; {sys.executable} is "
        "Python 3.10.13: run it with a newer Python (nodes with the version of "
        "their clients)"
    )


def _python310() -> str | None:
    """A Python 3.10 that runs here (not a pyenv shim of a version not selected)."""
    pyenv = Path.home() / ".pyenv" / "versions"
    candidates = [shutil.which("python3.10"), *pyenv.glob("3.10*/bin/python3.10")]
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            out = subprocess.run(
                [str(candidate), "-c", "import sys; print(sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
        except OSError:
            continue
        if out.strip() == "(3, 10)":
            return str(candidate)
    return None


def test_a_real_python_310_running_a_node_is_told() -> None:
    python = _python310()
    if python is None:
        pytest.skip("no Python 3.10 on this machine")
    said = _said([python, "-m", "nodeserver", "--help"])
    assert said.startswith(
        f"ImportError: dispynb needs Python 3.11 or newer; {python} is Python 3.10."
    ), said
