"""The JupyterLab extension in a real browser: a `jupyter lab` server, its kernel, the
kernel's local nodes and Debian's Chromium (Playwright), all inside a private network
namespace (`unshare -n`, loopback only), so nothing leaves 127.0.0.1.

The tests here re-run the browser tests of this folder (`conftest.INNER`: the
panel, Stop, saved notebooks, the engines) under ``unshare -n`` (pytest in the
namespace, with ``DISPYNB_IN_NETNS=1``) and only check that the inner run passed.
``DISPYNB_SCREENSHOTS=1`` saves ``docs/labextension.png`` and ``docs/lab-stop.png``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import requires_chromium
from tests.labextension.conftest import INNER
from tests.labextension.labpage import ROOT
from tests.nodeproc import inner_pytest

pytestmark = [pytest.mark.browser, requires_chromium]

IN_NETNS = os.environ.get("DISPYNB_IN_NETNS") == "1"
LAB_EXTENSION = Path(sys.prefix, "share/jupyter/labextensions/dispynb-labextension")


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(
        ["unshare", "-n", "ip", "link", "set", "lo", "up"],
        capture_output=True,
        timeout=20,
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.decode().strip()}"
    return None


def _sources_newer_than(built: Path) -> Path | None:
    """A source of the extension changed after ``built`` was installed, if any (the
    rule ./dev follows to rebuild it)."""
    since = built.stat().st_mtime
    sources = ROOT / "labextension"
    for path in (
        sources / "package.json",
        *sources.glob("src/**/*"),
        *sources.glob("style/**/*"),
    ):
        if path.is_file() and path.stat().st_mtime > since:
            return path.relative_to(ROOT)
    return None


@pytest.mark.timeout(600)
@pytest.mark.skipif(IN_NETNS, reason="the outer half runs outside the namespace")
def test_lab_panel_in_private_network() -> None:
    """Run the lab tests in private network and PID namespaces; they must pass."""
    reason = _can_unshare()
    if reason is not None:
        pytest.skip(reason)
    assert LAB_EXTENSION.joinpath("package.json").exists(), (
        f"the extension is not installed in {LAB_EXTENSION}: run ./dev test (or "
        "pip install -e .) to build and install it"
    )
    newer = _sources_newer_than(LAB_EXTENSION / "package.json")
    assert not newer, (
        f"{newer} changed after the extension in {LAB_EXTENSION} was built: the "
        "browser would run the old panel; run ./dev test (it rebuilds) or "
        "pip install -e ."
    )
    here = Path(__file__).parent.relative_to(ROOT)
    skip = {"test_lab_engines.py::test_lab_ray"}  # its own test, below
    if importlib.util.find_spec("distributed") is None:
        skip.add("test_lab_engines.py::test_lab_dask")
    tests = [f"{here / test}" for test in INNER if test not in skip]
    inner = inner_pytest(*tests)
    # A PID namespace too, with sh as its PID 1 (no exec): if the inner pytest is
    # killed (this timeout, an interrupted run), its node, Jupyter server, kernels
    # and browser end with the namespace instead of running on as orphans.
    proc = subprocess.run(
        [
            "unshare", "-n", "-p", "-f", "--kill-child", "--mount-proc",
            "sh", "-c", 'ip link set lo up && "$@"; exit $?', "sh", *inner,
        ],
        env={**os.environ, "DISPYNB_IN_NETNS": "1"},
        capture_output=True,
        text=True,
        timeout=560,
    )  # fmt: skip
    assert proc.returncode == 0, f"inner run failed:\n{proc.stdout}\n{proc.stderr}"
    assert f"{len(tests)} passed" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.timeout(500)
@pytest.mark.skipif(IN_NETNS, reason="the outer half runs outside the namespace")
def test_lab_ray_in_private_network() -> None:
    """Run `test_lab_ray` in private network and PID namespaces (Ray's daemons end
    with the namespace, and ``ray stop`` there sees only them); it must pass."""
    reason = _can_unshare()
    if reason is not None:
        pytest.skip(reason)
    if importlib.util.find_spec("ray") is None:
        pytest.skip(
            "ray is not installed: pip install ray (or '.[test]' in dispynb's checkout)"
        )
    here = Path(__file__).parent.relative_to(ROOT)
    inner = inner_pytest(f"{here / 'test_lab_engines.py'}::test_lab_ray")
    # sh stays PID 1 of the namespace (no exec): Ray's daemons are its orphans.
    proc = subprocess.run(
        [
            "unshare", "-n", "-p", "-f", "--kill-child", "--mount-proc",
            "sh", "-c", 'ip link set lo up && "$@"; exit $?', "sh", *inner,
        ],
        env={**os.environ, "DISPYNB_IN_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=480,
    )  # fmt: skip
    assert proc.returncode == 0, f"inner run failed:\n{proc.stdout}\n{proc.stderr}"
    assert "1 passed" in proc.stdout, proc.stdout
