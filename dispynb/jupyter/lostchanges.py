"""A warning for a function that changes the notebook's globals and returns nothing.

A job runs on a node, in a process of its own, with a copy of the globals its
function uses. ``results.append(x)`` or ``global total; total += x`` there changes
that copy: the notebook's ``results`` stays as it was, and the jobs' results are
all None. People who know threads (or nothing else yet) write it that way, and the
run then looks as if it did nothing. `warn_lost_changes` says so before the jobs
are sent, once per function and global, pointing at the function's definition.

Only a function that returns no value is reported: one that fills a global cache
on its node (a model loaded on first use) and returns its result is right.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import threading
import types
import warnings
from typing import Any

from dispynb.jupyter.shipping import source_name
from dispynb.tracebacks import cell_name

__all__ = ["LostChangeWarning", "lost_changes", "warn_lost_changes"]

#: Methods that change the container (list, dict, set, deque) they are called on.
_MUTATORS = frozenset(
    {
        "append",
        "appendleft",
        "extend",
        "extendleft",
        "insert",
        "add",
        "update",
        "setdefault",
        "remove",
        "discard",
        "clear",
    }
)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


class LostChangeWarning(UserWarning):
    """A function sent to the nodes changes globals of the notebook (or program)
    and returns nothing: its changes stay on the nodes."""


def lost_changes(func: Any) -> list[str]:
    """The globals of ``func``'s module that its body changes (appends to, sets an
    item or attribute of, or assigns with ``global``), in the order written, if it
    returns no value; [] if it returns one, or its source cannot be read."""
    func = inspect.unwrap(func) if callable(func) else func
    if not isinstance(func, types.FunctionType):
        return []
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):  # no source (exec), or a lambda's line
        return []
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef):
        return []
    body = list(_own_nodes(node))
    if any(isinstance(n, ast.Return) and not _is_none(n.value) for n in body):
        return []
    declared = {name for n in body if isinstance(n, ast.Global) for name in n.names}
    local = set(func.__code__.co_varnames) | set(func.__code__.co_cellvars)
    changed: list[str] = []
    for n in body:
        for name in _changed_names(n, declared):
            # A parameter or a local of the same name is the job's own.
            ours = name in declared or name not in local
            # (a module's settings, ``os.environ[...] =``, are the node's own)
            module = isinstance(func.__globals__.get(name), types.ModuleType)
            if ours and name in func.__globals__ and not module and name not in changed:
                changed.append(name)
    return changed


def _own_nodes(function: ast.FunctionDef) -> Any:
    """The nodes of ``function``'s body, not those of the functions, lambdas and
    classes defined in it (their names are their own)."""
    stack: list[ast.AST] = list(function.body)
    while stack:
        node = stack.pop(0)
        if not isinstance(node, _SCOPES):
            yield node
            stack.extend(ast.iter_child_nodes(node))


def _is_none(value: ast.expr | None) -> bool:
    return value is None or (isinstance(value, ast.Constant) and value.value is None)


def _changed_names(node: ast.AST, declared: set[str]) -> list[str]:
    """The names whose value ``node`` changes in place (``x.append``, ``x[k] =``,
    ``x.a =``), or rebinds when declared ``global``."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _MUTATORS
        and isinstance(node.func.value, ast.Name)
    ):
        return [node.func.value.id]
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign | ast.Delete):
        targets = list(node.targets)
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        targets = [node.target]
    names = []
    for target in targets:
        for part in ast.walk(target):
            if isinstance(part, ast.Subscript | ast.Attribute) and isinstance(
                part.value, ast.Name
            ):
                names.append(part.value.id)
            elif isinstance(part, ast.Name) and part.id in declared:
                names.append(part.id)
    return names


_warned: set[tuple[str, str, str]] = set()
_warned_lock = threading.Lock()


def warn_lost_changes(func: Any) -> list[str]:
    """Warn (`LostChangeWarning`, at ``func``'s definition) if it changes globals
    and returns nothing; each (function, global) once per process. The globals
    warned about now."""
    changed = lost_changes(func)
    if not changed:
        return []
    func = inspect.unwrap(func)
    label = func.__qualname__
    with _warned_lock:
        new = [n for n in changed if (func.__module__, label, n) not in _warned]
        _warned.update((func.__module__, label, n) for n in new)
    if not new:
        return []
    code = func.__code__
    where = "the notebook" if cell_name(code.co_filename) else "this program"
    names = " and ".join(new)
    which = "a global" if len(new) == 1 else "globals"
    warnings.warn_explicit(
        f"{label} changes {names}, {which} of {where}, and returns nothing: each "
        f"job changes a copy of {new[0]} on its node, never the one of {where}, "
        f"which stays as it was, and its result is None; return what the job "
        f"computes instead (the run's results hold it, in the order of the inputs)",
        LostChangeWarning,
        source_name(code.co_filename),  # Cell In[3], as IPython names it
        code.co_firstlineno,
        module=func.__module__ or "__main__",
    )
    return new
