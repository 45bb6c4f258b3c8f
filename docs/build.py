"""Build the documentation site: ``python docs/build.py [OUTDIR]``.

What ``./dev docs`` and ``tests/docs`` run: a fresh Sphinx build (no stale reference
from an earlier build), warnings as errors, the notebooks executed. Offline: nothing
is fetched. The notebooks' kernels import dispynb from this checkout, as autodoc does.
Set ``DISPYNB_DOCS_EXECUTE=off`` to skip running the notebooks while writing pages.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)

#: Seconds the processes the notebooks started (kernels, local nodes) get to exit
#: once the build is over.
REAP_TIMEOUT = 15.0

_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Adopt orphaned descendants (a kernel's local nodes), so that `_reap` sees
    every process the build started, wherever it was re-parented (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap() -> list[str]:
    """Wait for every process the build started to exit; kill and name the others."""
    import psutil

    deadline = time.monotonic() + REAP_TIMEOUT
    me = psutil.Process()
    while True:
        children = me.children(recursive=True)
        _gone, alive = psutil.wait_procs(children, timeout=0.2)
        if not alive:
            return []
        if time.monotonic() > deadline:
            break
    left = []
    for proc in alive:
        try:
            left.append(f"{proc.pid} {' '.join(proc.cmdline()[:4])}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)
    return left


def _kernels_on_unix_sockets(folder: str) -> None:
    """Start the notebooks' kernels on Unix sockets in ``folder`` (this user's
    alone), not on TCP ports: a kernel on TCP without CurveZMQ keys (nbclient's
    default) warns on the build's output, once per notebook, that it is sent code
    and outputs in plain text (ipykernel 7.4+). myst-nb runs the notebooks through
    nbclient's `execute` and has no setting for the kernels' transport: that
    function is given a client whose kernel manager uses Unix sockets."""
    import nbclient.client
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class UnixSocketKernelManager(AsyncKernelManager):
        """A kernel reached over Unix sockets in ``folder``."""

        @default("transport")
        def _unix_sockets(self) -> str:
            return "ipc"

        def _ip_default(self) -> str:
            # Absolute: the kernel runs in its notebook's folder, the build here.
            return os.path.join(folder, f"kernel-{uuid.uuid4().hex[:12]}")

    class UnixSocketClient(nbclient.client.NotebookClient):
        """nbclient's client, with kernels on Unix sockets."""

        @default("kernel_manager_class")
        def _unix_socket_kernels(self) -> type[AsyncKernelManager]:
            return UnixSocketKernelManager

    nbclient.client.NotebookClient = UnixSocketClient  # type: ignore[misc]


def _root_logger_at_warning() -> None:
    """Configure the root logger first, at WARNING: accessible-pygments (a theme
    dependency, imported when Sphinx looks up Pygments styles) calls
    ``logging.basicConfig(level=INFO)`` on import, which then printed the INFO
    records of every library, as nbclient's 'Executing notebook with kernel' for
    each notebook (`logging.basicConfig` does nothing once the root logger has a
    handler)."""
    logging.basicConfig(level=logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "outdir",
        nargs="?",
        default=os.path.join(DOCS, "_build", "html"),
        help="where the HTML goes (default: docs/_build/html)",
    )
    args = parser.parse_args(argv)
    outdir = os.path.abspath(args.outdir)
    paths = [ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    from sphinx.cmd.build import build_main

    _become_subreaper()
    _root_logger_at_warning()
    sockets = tempfile.mkdtemp(prefix="dispynb-docs-")
    _kernels_on_unix_sockets(sockets)
    try:
        status = build_main(
            [
                "-W",  # warnings are errors
                "--keep-going",  # ... but report all of them
                "-E",  # a fresh environment: the reference follows the code
                "-b",
                "html",
                "-d",
                os.path.join(outdir, ".doctrees"),
                DOCS,
                outdir,
            ]
        )
        left = _reap()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    if left:
        print(f"docs build: processes left running (killed): {left}", file=sys.stderr)
        return status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
