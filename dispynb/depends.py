"""Sorting a computation's (or a job's) dependencies into files and names.

dispy's ``depends`` may hold files, modules, functions, classes and instances. Files
and modules' source files are sent as files (by content digest) into the
computation's directory on the node; functions and classes (an instance stands for its
class) are sent by value and put in the computation's globals under their names.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import types
from dataclasses import dataclass, field
from typing import Any

from dispynb.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class FileRef:
    """A local file to send: where it is, its name on the node, its content digest."""

    path: str
    relative: str
    digest: str
    size: int
    #: It is a program (any execute bit set): the nodes keep it executable.
    executable: bool = False

    def read(self) -> bytes:
        """The file's content (checked against the digest it was announced with)."""
        with open(self.path, "rb") as handle:
            data = handle.read()
        if hashlib.sha256(data).hexdigest() != self.digest:
            raise ConfigurationError(f"{self.path} changed after it was given")
        return data


@dataclass(slots=True)
class Dependencies:
    """Files to send, and objects to put in the computation's globals by name."""

    files: list[FileRef] = field(default_factory=list)
    names: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.files or self.names)


def collect(items: list[Any] | tuple[Any, ...], what: str = "depends") -> Dependencies:
    """Sort ``items`` (dispy's ``depends`` forms) into files and names.

    Raises `ConfigurationError` naming the item that is none of the accepted forms.
    """
    deps = Dependencies()
    for index, item in enumerate(items):
        where = f"{what}[{index}]"
        if isinstance(item, str | os.PathLike):
            deps.files.append(file_ref(os.fspath(item), where))
        elif isinstance(item, types.ModuleType):
            deps.files.append(_module_file(item, where))
        elif isinstance(item, functools.partial):
            deps.names[item.func.__name__] = item.func
        elif (
            inspect.isfunction(item) or inspect.isclass(item) or inspect.isbuiltin(item)
        ):
            deps.names[item.__name__] = item
        elif inspect.ismethod(item):
            deps.names[type(item.__self__).__name__] = type(item.__self__)
        else:  # an instance: dispy sends its class
            _refuse_value(item, where)
            deps.names[type(item).__name__] = type(item)
    return deps


def check(items: list[Any] | tuple[Any, ...], what: str = "depends") -> None:
    """Raise `ConfigurationError` for the first of ``items`` that `collect` would
    refuse (a path that is not a file, a number, a module without a source file),
    reading no file: a mistake is said before anything starts."""
    for index, item in enumerate(items):
        where = f"{what}[{index}]"
        if isinstance(item, str | os.PathLike):
            if not os.path.isfile(item):
                raise ConfigurationError(f"{where}: {os.fspath(item)!r} is not a file")
        elif isinstance(item, types.ModuleType):
            _module_path(item, where)
        else:
            _refuse_value(item, where)


def _refuse_value(item: Any, where: str) -> None:
    """Refuse what is no dependency (an instance of these sends no class)."""
    if item is None or isinstance(item, int | float | bytes | bool):
        raise ConfigurationError(
            f"{where}: {item!r} is not a dependency; give files (paths), modules, "
            "functions, classes or instances"
        )


def file_ref(path: str, where: str = "file") -> FileRef:
    """A `FileRef` for ``path``: named on the node by its path relative to the
    current directory when it is below it, else by its base name."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ConfigurationError(f"{where}: {path!r} is not a file")
    cwd = os.getcwd()
    if full.startswith(cwd.rstrip(os.sep) + os.sep):
        relative = os.path.relpath(full, cwd).replace(os.sep, "/")
    else:
        relative = os.path.basename(full)
    with open(full, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        info = os.fstat(handle.fileno())
    executable = bool(info.st_mode & 0o111)
    return FileRef(full, relative, digest, info.st_size, executable)


def _module_path(module: types.ModuleType, where: str) -> str:
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        raise ConfigurationError(
            f"{where}: module {module.__name__!r} has no Python source file to send; "
            "install it on the nodes instead"
        )
    return str(path)


def _module_file(module: types.ModuleType, where: str) -> FileRef:
    path = _module_path(module, where)
    relative = module.__name__.replace(".", "/")
    relative += "/__init__.py" if os.path.basename(path) == "__init__.py" else ".py"
    ref = file_ref(path, where)
    return FileRef(ref.path, relative, ref.digest, ref.size)
