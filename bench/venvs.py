"""Private virtual environments for the peers and the plots, under ``bench/.venvs/``.

Each peer (dispy, ipyparallel, Dask, Ray, loky) and the plotting script get their own
environment, created on first use with ``python -m venv`` and ``pip install`` and
reused afterwards, so nothing a peer needs ever lands in the project's ``.venv``. A
stamp file records the requirements an environment was built with; when they change,
the environment is rebuilt.

Creating an environment needs the package index, so it happens *outside* the private
network namespace in which the benchmark measures (``run.py --prepare``, or the first
step of a plain ``run.py`` run); inside the namespace a missing environment is an error.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["REQUIREMENTS", "VENV_ROOT", "VenvError", "ensure_venv", "venv_python"]

VENV_ROOT = Path(__file__).resolve().parent / ".venvs"

#: Environment name -> pip requirements. Versions are pinned so that reruns compare
#: the same releases; psutil is needed by the driver to measure memory.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "dispy": ("dispy==4.15.2", "pycos==4.12.2", "psutil"),
    "ipyparallel": ("ipyparallel==9.2.0", "psutil"),
    "dask": ("distributed==2026.8.0", "psutil"),
    "ray": ("ray==2.60.0", "psutil"),
    "loky": ("loky==3.7.0", "psutil"),
    "plot": ("matplotlib==3.11.2",),
}

STAMP = ".bench-requirements"


class VenvError(RuntimeError):
    """An environment is missing and cannot be created here, or pip failed."""


def venv_python(name: str) -> Path:
    """The interpreter of environment ``name`` (it may not exist yet)."""
    return VENV_ROOT / name / "bin" / "python"


def _stamp_text(name: str) -> str:
    return "\n".join(REQUIREMENTS[name]) + "\n"


def is_ready(name: str) -> bool:
    """Whether environment ``name`` exists with the current requirements."""
    stamp = VENV_ROOT / name / STAMP
    return (
        venv_python(name).exists()
        and stamp.exists()
        and stamp.read_text(encoding="utf-8") == _stamp_text(name)
    )


def ensure_venv(name: str, *, install: bool = True) -> Path:
    """Return the interpreter of environment ``name``, creating it if needed.

    Parameters
    ----------
    name:
        A key of `REQUIREMENTS`.
    install:
        Whether creating or updating it is allowed (``False`` inside the namespace,
        where the package index cannot be reached).

    Raises
    ------
    VenvError
        It is missing or outdated and ``install`` is false, or pip failed.
    """
    if name not in REQUIREMENTS:
        raise VenvError(f"no environment named {name!r}")
    python = venv_python(name)
    if is_ready(name):
        return python
    if not install:
        raise VenvError(
            f"the {name} environment ({VENV_ROOT / name}) is missing or outdated and"
            " cannot be installed without network access: run"
            " `.venv/bin/python bench/run.py --prepare` outside the namespace first"
        )
    directory = VENV_ROOT / name
    if directory.exists():
        shutil.rmtree(directory)
    print(f"bench: creating {directory} ...", file=sys.stderr, flush=True)
    _check_call([sys.executable, "-m", "venv", str(directory)])
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _check_call([*pip, "--upgrade", "pip"])
    _check_call([*pip, *REQUIREMENTS[name]])
    (directory / STAMP).write_text(_stamp_text(name), encoding="utf-8")
    return python


def _check_call(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VenvError(
            f"command failed ({proc.returncode}): {' '.join(command)}\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(REQUIREMENTS):
        print(arg, ensure_venv(arg))
