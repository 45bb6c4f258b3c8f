"""An IPython shell with dispynb's magics loaded, for the tests of ``%dispy`` and
``%%dispy`` that run in the test's process (`kernel.py`: in a real kernel)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

from dispynb import LocalCluster


@contextmanager
def dispynb_shell() -> Iterator[InteractiveShell]:
    """IPython's shell (history in memory) with ``%load_ext dispynb``; its nodes
    closed (``%dispy close``) and the extension unloaded after."""
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    try:
        yield shell
    finally:
        with capture_output():
            shell.run_line_magic("dispy", "close")
        shell.run_line_magic("unload_ext", "dispynb")


@contextmanager
def magic_shell(local: str) -> Iterator[InteractiveShell]:
    """`dispynb_shell` with the nodes of ``%dispy local LOCAL`` (``local``: its
    options)."""
    with dispynb_shell() as shell:
        with capture_output() as captured:
            shell.run_line_magic("dispy", f"local {local}")
        said = captured.stdout
        assert said.startswith("dispynb: local nodes 127.0.0.1:"), said
        yield shell


@contextmanager
def shell_on(nodes: LocalCluster) -> Iterator[InteractiveShell]:
    """`dispynb_shell` whose cells run on ``nodes`` (a module's local node), not on
    nodes of its own."""
    with dispynb_shell() as shell:
        magics = shell.magics_manager.registry["DispyMagics"]
        magics.session.nodes = nodes
        try:
            yield shell
        finally:
            magics.session.nodes = None


def cell(ip: InteractiveShell, line: str, body: str) -> tuple[object, str, str]:
    """Run ``%%dispy line`` over ``body``; return (result, stdout, stderr)."""
    with capture_output() as captured:
        result = ip.run_cell_magic("dispy", line, body)
    return result, captured.stdout, captured.stderr
