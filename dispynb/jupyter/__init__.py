"""dispynb's Jupyter layer: magics, progress, node panel, DataFrames, HTML reprs.

The only part of dispynb that imports IPython, ipywidgets or pandas (install them with
``pip install '.[jupyter]'`` in dispynb's checkout), and each module imports them only
when used: `Run` and the progress bars work in plain Python.

Contents
--------
run.Run
    Jobs submitted together, followed live; ``run.df`` is a DataFrame.
frames.jobs_frame, frames.nodes_frame
    Jobs and nodes of any cluster as pandas DataFrames.
progress
    Progress bars: widget, static HTML, text.
widgets.NodePanel
    A live table of the nodes in use.
display
    HTML templates for runs, jobs, clusters and nodes.
shipping
    What a shipped function captures; the warning for large captured objects.
tracebacks
    Remote tracebacks re-rendered to point at the cells the code came from.
magics
    ``%dispy`` and ``%%dispy``; loaded by ``%load_ext dispynb``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispynb.jupyter.errors import MagicError, RunInterrupted
    from dispynb.jupyter.frames import jobs_frame, nodes_frame
    from dispynb.jupyter.progress import ProgressCounts, make_progress
    from dispynb.jupyter.run import Run
    from dispynb.jupyter.widgets import NodePanel

__all__ = [
    "MagicError",
    "NodePanel",
    "ProgressCounts",
    "Run",
    "RunInterrupted",
    "jobs_frame",
    "load_ipython_extension",
    "make_progress",
    "nodes_frame",
    "unload_ipython_extension",
]

_LAZY: dict[str, str] = {
    "MagicError": "dispynb.jupyter.errors",
    "RunInterrupted": "dispynb.jupyter.errors",
    "NodePanel": "dispynb.jupyter.widgets",
    "ProgressCounts": "dispynb.jupyter.progress",
    "Run": "dispynb.jupyter.run",
    "jobs_frame": "dispynb.jupyter.frames",
    "make_progress": "dispynb.jupyter.progress",
    "nodes_frame": "dispynb.jupyter.frames",
}


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext dispynb``: register the ``%dispy`` and ``%%dispy`` magics."""
    from dispynb.jupyter.magics import DispyMagics

    ipython.register_magics(DispyMagics(ipython))


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext dispynb``: close the session's runs and local nodes."""
    from dispynb.jupyter.magics import DispyMagics

    magics = ipython.magics_manager.registry.get(DispyMagics.__name__)
    if magics is not None:
        magics.session.close()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dispynb.jupyter' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
