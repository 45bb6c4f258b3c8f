"""Checks of what a cluster ships and runs (the computation, its dependencies,
setup and cleanup), of the callbacks it calls, and of where the computation's
files go on the nodes and on the client."""

from __future__ import annotations

import inspect
import os
import posixpath
import reprlib
import shutil
import sys
from collections.abc import Callable
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from dispynb.defaults import MAX_DEST_PATH_PARTS
from dispynb.errors import ConfigurationError


def _refuse_async(value: Callable[..., Any], role: str) -> None:
    """Refuse an ``async def`` (or async generator) function as ``role``: a node
    calls it as dispy does, gets a coroutine instead of its result, and the job
    would end with the coroutine's pickling error."""
    call = getattr(value, "__call__", None)  # noqa: B004  # an async __call__ too
    if any(
        inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)
        for f in (value, call)
    ):
        raise ConfigurationError(
            f"{role} {_name(value)} is an async function: nodes call it as a plain "
            "function and would get a coroutine, not its result. Define it with "
            "'def'; to use asyncio inside, have it return asyncio.run(...) of your "
            "coroutine"
        )


def _check_computation(value: object) -> Callable[..., Any] | str:
    """Accept any callable, or a program name or path (resolved to an absolute path)."""
    if callable(value):
        _refuse_async(value, "computation")
        return value  # shipped by value with cloudpickle: partials and methods work
    if isinstance(value, str | os.PathLike):
        name = os.fspath(value)
        path = os.path.expanduser(name)
        if name and os.path.isfile(path):
            return os.path.abspath(path)
        found = shutil.which(name) if name else None
        if found is not None:
            return os.path.abspath(found)
        raise ConfigurationError(
            f"program {name!r} was not found: give the path of an existing file "
            f"or the name of a program on PATH{_named_function(name)}"
        )
    got = "None"
    if value is not None:  # a value: most likely what calling the function returned
        kind = type(value).__name__
        got = (
            f"{reprlib.repr(value)}, {'an' if kind[:1] in 'aeiou' else 'a'} {kind} "
            "(was the function called, JobCluster(f(x))? give it uncalled: "
            "JobCluster(f))"
        )
    raise ConfigurationError(
        "computation must be a callable (a function, a method, a functools.partial, "
        f"a callable object) or the name or path of a program; got {got}"
    )


def _named_function(name: str) -> str:
    """If ``name`` names a function of the running program (a script's or a
    notebook's ``__main__``), the advice to pass the function itself, as
    ``JobCluster(compute)``, not its name ('compute' is taken for a program)."""
    main = sys.modules.get("__main__")
    if not name.isidentifier() or not callable(getattr(main, name, None)):
        return ""
    return (
        f"; {name} is a function of this program: give the function itself, "
        f"JobCluster({name}), not its name"
    )


def _check_depends(value: Any) -> list[Any]:
    """Return a new list of dependencies; file paths must exist."""
    if value is None:
        items: list[Any] = []
    elif isinstance(value, list | tuple):
        items = list(value)  # never mutate the caller's list (a dispy bug)
    else:
        items = [value]
    for item in items:
        if isinstance(item, str | os.PathLike) and not os.path.isfile(item):
            raise ConfigurationError(
                f"depends entry {os.fspath(item)!r} is not an existing file: give the "
                "path of a file, or a module, function, class or instance"
            )
    return items


def _check_setup(value: object) -> Callable[..., Any] | None:
    if callable(value):
        _refuse_async(value, "setup")
    if value is None or callable(value):
        return value
    raise ConfigurationError(
        "setup must be a function run once on each node before any job, or None; "
        f"got a {type(value).__name__}"
    )


def _check_cleanup(value: object) -> bool | Callable[..., Any]:
    if callable(value):
        _refuse_async(value, "cleanup")
    if isinstance(value, bool) or callable(value):
        return value
    raise ConfigurationError(
        "cleanup must be True (delete the computation's files on nodes when it "
        "closes), False (keep them) or a function run on each node at close; "
        f"got {value!r}"
    )


def check_callback(value: Any, name: str, params: list[str]) -> Any:
    """Check that a status callback can be called with ``len(params)`` positionals."""
    if value is None:
        return None
    expected = f"def {name}({', '.join(params)}): ..."
    if not callable(value):
        raise ConfigurationError(
            f"{name} must be a function like `{expected}`; got a {type(value).__name__}"
        )
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return value  # some builtins have no signature: nothing to check
    try:
        signature.bind(*params)
    except TypeError:
        count = {1: "one", 3: "three"}.get(len(params), str(len(params)))
        plural = "" if len(params) == 1 else "s"
        raise ConfigurationError(
            f"{name} must accept exactly {count} positional argument{plural}, like "
            f"`{expected}` (a method may take self first); "
            f"{_name(value)}{signature} does not"
        ) from None
    return value


def _name(fn: Callable[..., Any]) -> str:
    """A readable name for a callable, for messages."""
    return getattr(fn, "__qualname__", None) or repr(fn)


def _check_dest_path(value: Any) -> str | None:
    """Accept a relative path that stays inside the node's directory."""
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ConfigurationError(
            f"dest_path must be a relative path, or None; got a {type(value).__name__}"
        )
    path = os.fspath(value)
    if not path:
        return None
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).anchor:
        relative = PureWindowsPath(path).relative_to(PureWindowsPath(path).anchor)
        raise ConfigurationError(
            f"dest_path {path!r} is absolute: give a path relative to the node's "
            f"directory for computations, such as {relative.as_posix()!r}"
        )
    path = posixpath.normpath(path.replace("\\", "/"))
    if path == ".." or path.startswith("../"):
        raise ConfigurationError(
            f"dest_path {value!r} leads out of the node's directory: give a relative "
            "path without '..'"
        )
    parts = path.count("/") + 1
    if parts > MAX_DEST_PATH_PARTS:  # as nodes count them (a scheduler adds one)
        raise ConfigurationError(
            f"dest_path {path[:40]!r}... names {parts} directories: at most "
            f"{MAX_DEST_PATH_PARTS} are taken"
        )
    return path


def _check_files_dir(value: Any) -> str:
    """The folder where files sent by jobs land: an existing directory (default cwd)."""
    if value is None:
        return os.getcwd()
    path: str = os.path.abspath(os.fspath(value))
    if not os.path.isdir(path):
        raise ConfigurationError(
            f"files_dir {path!r} is not an existing directory: create it first"
        )
    return path
