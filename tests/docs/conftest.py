"""The documentation site, built once per test session and served on 127.0.0.1."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

#: The whole build (six notebooks executed, each cell within 45 s) must end in this.
BUILD_TIMEOUT = 480


@dataclass(frozen=True)
class Site:
    """A built site: its folder and the URL it is served at."""

    path: Path
    url: str
    output: str  # what the build printed (stdout and stderr)


def build_site(outdir: Path) -> str:
    """``python docs/build.py OUTDIR``, as ``./dev docs`` runs it; what it printed.
    Fail with its output if it fails or takes too long (its processes are then
    killed)."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, str(DOCS / "build.py"), str(outdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        output, _ = proc.communicate()
        pytest.fail(f"the docs build took over {BUILD_TIMEOUT} s:\n{output[-5000:]}")
    if proc.returncode != 0:
        pytest.fail(f"the docs build failed ({proc.returncode}):\n{output[-8000:]}")
    return output


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """Kill the build and everything it started (kernels run in their own sessions)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The site, built once, served by a static file server on 127.0.0.1."""
    outdir = tmp_path_factory.mktemp("docs") / "html"
    output = build_site(outdir)
    handler = functools.partial(_QuietHandler, directory=str(outdir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Site(outdir, f"http://127.0.0.1:{server.server_address[1]}/", output)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
