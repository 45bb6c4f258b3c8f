"""A module of the person's own that a node could not import: a ``.py`` file beside
the notebook (or anywhere not installed) imports in the kernel, but a node runs its
jobs in a directory of its own, where the module is only if the run sends it."""

from __future__ import annotations

import importlib.util
import os
import re
import site
import sys
import sysconfig

__all__ = ["own_module_hint", "without_client_advice"]

#: How an ImportError names the module it could not find.
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")


def own_module_hint(text: str) -> str:
    """A line saying how to send the module ``text`` (an error, a traceback) says a
    node could not import, when the kernel imports it from a file of the person's;
    ``""`` otherwise (an installed package the nodes lack is not a file to send)."""
    found = _NO_MODULE.findall(text)
    if not found:
        return ""
    name = found[-1].split(".")[0]  # the top package: finding it imports nothing
    path = _source_of(name)
    if path is None or _installed(path):
        return ""
    if os.path.dirname(path) == os.getcwd():  # beside the notebook: by its name
        how = f"--depends \"['{os.path.basename(path)}']\""
    else:  # sent as the module object, it arrives where its name imports it
        how = f'--depends "[{name}]" (after import {name})'
    return (
        f"dispynb: {name} is your module ({path}), which the nodes do not have: "
        f"send it with the run (%%dispy {how}), or install it on the nodes\n"
    )


def _source_of(name: str) -> str | None:
    """The ``.py`` file the kernel imports ``name`` from (imported or not)."""
    module = sys.modules.get(name)
    path: str | None
    if module is not None:
        path = getattr(module, "__file__", None)
    else:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        path = spec.origin if spec is not None else None
    # A package's __init__.py sent alone would not import the rest of it.
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    if os.path.basename(path) == "__init__.py":
        return None
    return os.path.abspath(path)


def _installed(path: str) -> bool:
    """Whether ``path`` is in the standard library or a site-packages directory."""
    paths = sysconfig.get_paths()
    roots = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    roots += [site.getusersitepackages(), *site.getsitepackages()]
    real = os.path.realpath(path)
    return any(
        real.startswith(os.path.realpath(root).rstrip(os.sep) + os.sep)
        for root in roots
        if root
    )


#: The advice `dispynb.tracebacks.explain_missing_module` adds to a job's traceback
#: for a program's JobCluster; a cell gives its own, in %%dispy's words.
_CLIENT_ADVICE = "(this client imports "


def without_client_advice(traceback: str) -> str:
    """``traceback`` without the JobCluster advice on its last line, if it has it."""
    body, _, last = traceback.rstrip("\n").rpartition("\n")
    return body if body and last.startswith(_CLIENT_ADVICE) else traceback
