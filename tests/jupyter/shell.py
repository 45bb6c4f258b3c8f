"""An IPython shell with dispynb's magics loaded, for the tests of ``%dispy`` and
``%%dispy`` that run in the test's process (`kernel.py`: in a real kernel)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config


@contextmanager
def magic_shell(local: str) -> Iterator[InteractiveShell]:
    """IPython's shell with ``%load_ext dispynb`` and the nodes of ``%dispy local
    LOCAL`` (``local``: its options); closed and unloaded after."""
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    with capture_output() as captured:
        shell.run_line_magic("dispy", f"local {local}")
    assert captured.stdout.startswith("dispynb: local nodes 127.0.0.1:"), (
        captured.stdout
    )
    yield shell
    shell.run_line_magic("dispy", "close")
    shell.run_line_magic("unload_ext", "dispynb")


def cell(ip: InteractiveShell, line: str, body: str) -> tuple[object, str, str]:
    """Run ``%%dispy line`` over ``body``; return (result, stdout, stderr)."""
    with capture_output() as captured:
        result = ip.run_cell_magic("dispy", line, body)
    return result, captured.stdout, captured.stderr
