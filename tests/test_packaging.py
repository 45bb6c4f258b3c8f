"""dispynb as ``pip install`` gives it: the wheel built from this checkout, installed
into a new virtual environment, run from a directory outside the checkout.

The tests elsewhere import the checkout (an editable install); a module, a data
file or a program missing from the wheel would show only to users. The wheel is
built without network (``--no-build-isolation --no-index``: the build requirements
are in the test venv, and the JupyterLab extension's build, made by ``./dev``, is
taken as it is); the new environment gets its dependencies from the test venv by a
path file, never dispynb itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb._check_python import OLDEST
from tests.docs.test_readme import readme_script
from tests.test_old_python import _python310

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def run(*command: str | Path, cwd: Path, **env: str) -> str:
    """Run ``command`` (a timeout fails the test); its output, if it succeeded."""
    done = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**_clean_env(), **env},
    )
    assert done.returncode == 0, f"{command}: {done.returncode}\n{done.stderr}"
    return done.stdout


def _clean_env() -> dict[str, str]:
    """This environment without what would make Python import the checkout."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    bin_dir = Path(sys.executable).parent  # jlpm, should the extension need a build
    run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
        "--no-deps", "--no-index", "-w", out, ROOT,
        cwd=out, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    )  # fmt: skip
    (built,) = out.glob("dispynb-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtual environment with the wheel installed (dependencies: the test
    venv's, through a path file)."""
    home = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", home, cwd=home)
    python = home / "bin" / "python"
    site = run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        cwd=home,
    ).strip()  # fmt: skip
    Path(site, "test-venv-dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8"
    )
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q",
        "--no-deps", "--no-index", wheel,
        cwd=home,
    )  # fmt: skip
    yield home


def test_the_wheel_holds_the_packages_the_programs_and_the_lab_extension(
    wheel: Path,
) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("dispynb", "nodeserver", "schedserver"):
        assert f"{package}/__init__.py" in names, package
        assert f"{package}/py.typed" in names or package == "schedserver", package
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    data = "dispynb-0.1.0.data/data/share/jupyter/labextensions/dispynb-labextension"
    assert f"{data}/package.json" in names
    assert any(n.startswith(f"{data}/static/") and n.endswith(".js") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for program in ("dispynb", "dispynb-node", "dispynb-scheduler"):
        assert f"{program} = " in text, text


def test_the_installed_programs_and_the_readme_example_run_outside_the_checkout(
    venv: Path, tmp_path: Path
) -> None:
    """What a user who ran ``pip install dispynb`` types: the programs answer, and
    the README's script example (local nodes started for it) prints its results,
    with dispynb and its node server imported from the new environment."""
    python = venv / "bin" / "python"
    where = run(
        python, "-c", "import dispynb, nodeserver, schedserver; "
        "print(dispynb.__file__, nodeserver.__file__, schedserver.__file__)",
        cwd=tmp_path,
    ).split()  # fmt: skip
    assert all(path.startswith(str(venv)) for path in where), where
    for program in ("dispynb-node", "dispynb-scheduler", "dispynb"):
        assert "usage:" in run(venv / "bin" / program, "--help", cwd=tmp_path)
    script = tmp_path / "example.py"
    script.write_text(readme_script(), encoding="utf-8")
    printed = run(python, script, cwd=tmp_path)
    assert printed.strip() == str([i * i for i in range(10)]), printed
    labext = venv / "share" / "jupyter" / "labextensions" / "dispynb-labextension"
    assert (labext / "package.json").is_file()


def test_pip_on_python_310_refuses_the_wheel_saying_which_python_it_needs(
    wheel: Path, tmp_path: Path
) -> None:
    """A user of Python 3.10 gets pip's own refusal, naming both versions, not an
    install that fails at ``import dispynb`` (requires-python is the oldest
    Python `dispynb._check_python` takes)."""
    python = _python310()
    if python is None:
        pytest.skip("no Python 3.10 on this machine")
    done = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_clean_env(),
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith(
        "ERROR: Package 'dispynb' requires a different Python: 3.10."
    ), done.stderr
    assert said.endswith(" not in '>={}.{}'".format(*OLDEST)), done.stderr
