"""``./dev``, the README's first command, says what it does while it sets ``.venv``
up: a first ``./dev demo`` installs for minutes (pip runs quietly), and a newcomer
looking at a silent terminal cannot tell it from a hang.

The script runs in a copy of the checkout's ``dev`` and ``pyproject.toml``, its
``.venv`` made of stub programs that log their arguments (no real install)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A directory holding ``dev``, ``pyproject.toml`` and a stub ``.venv``."""
    for name in ("dev", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "dispynb"):
        stub = bin_dir / name
        stub.write_text(STUB.format(log=tmp_path / "ran.log"))
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def dev(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``./dev ARGS`` in ``checkout``, with this Python as ``PYTHON``."""
    return subprocess.run(
        ["./dev", *args],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )


@pytest.mark.skipif(shutil.which("node") is None, reason="./dev needs Node.js")
def test_dev_says_it_sets_the_venv_up_then_that_it_is_ready(checkout: Path) -> None:
    first = dev(checkout, "demo")
    assert first.returncode == 0, first.stderr
    ran = (checkout / "ran.log").read_text()
    assert "pip install" in ran and "dispynb demo" in ran  # installed, then the demo
    assert "setting up .venv" in first.stderr
    assert "minutes" in first.stderr  # how long a newcomer should expect to wait
    assert ".venv is ready" in first.stderr
    # Its lines come before the install, and the ready line before the demo runs.
    assert first.stderr.index("setting up") < first.stderr.index("is ready")

    again = dev(checkout, "demo")
    assert again.returncode == 0, again.stderr
    assert "setting up" not in again.stderr  # set up already: nothing to say


OLD_PYTHON = """#!/bin/sh
if [ "$1" = --version ]; then echo "Python 3.10.13"; else exit 1; fi
"""


def test_dev_names_the_python_too_old_it_found(checkout: Path) -> None:
    """``python3`` 3.10 was refused with 'set PYTHON=...' and no word of which
    Python was tried, or what it was."""
    old = checkout / "python3.10"
    old.write_text(OLD_PYTHON)
    old.chmod(old.stat().st_mode | stat.S_IXUSR)
    for python, said in [(str(old), "Python 3.10.13"), ("no-such-python", "not found")]:
        done = subprocess.run(
            ["./dev", "demo"],
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHON": python},
        )
        assert done.returncode == 1
        first, _, rest = done.stderr.partition(f"; {python} is ")
        assert first == "dispynb needs Python 3.11 or newer", done.stderr
        assert rest == f"{said}: set PYTHON=/path/to/python3.11 (or newer)\n"
    assert not (checkout / "ran.log").exists()  # nothing installed or run
