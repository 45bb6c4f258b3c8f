"""What a function takes with it to the nodes, walked without pickling anything, and
a clear error when part of it cannot travel.

A computation travels by value (cloudpickle) with everything it refers to: the values
in its closure cells, the globals its code names, its default arguments, and the same
for the functions and classes it uses that travel by value too (those defined in a
notebook or a script). `reachable` walks that graph. `check_shippable` pickles a
function once, as a cluster will, and when that fails names the captured values to
blame (a lock, an open file, a connection), instead of pickle's bare
``cannot pickle '_thread.lock' object``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any

from dispynb.errors import SerializationError
from dispynb.protocol import serialize
from dispynb.protocol.serialize import code_objects, global_names

__all__ = ["Reached", "check_shippable", "code_objects", "global_names", "reachable"]

#: At most this many functions and classes are walked from one root.
_MAX_WALK = 2000

#: ``Py_TPFLAGS_HEAPTYPE``: set for classes defined in Python (never sent by value
#: otherwise).
_HEAPTYPE = 1 << 9


@dataclasses.dataclass
class Reached:
    """What `reachable` found: functions and classes sent by value, and the other
    values they capture as ``(name, kind, owner, value)``."""

    functions: list[types.FunctionType] = dataclasses.field(default_factory=list)
    classes: list[type] = dataclasses.field(default_factory=list)
    values: list[tuple[str, str, str, Any]] = dataclasses.field(default_factory=list)


def reachable(*roots: Any) -> Reached:
    """Walk what ``roots`` (functions, classes, callables) take with them by value.

    Nothing is pickled. Functions and classes that cloudpickle sends by reference
    (importable ones: installed packages, the standard library) are not followed.
    """
    found = Reached()
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = []

    def visit(value: Any, name: str, kind: str, owner: str) -> None:
        if id(value) in seen:
            return
        if isinstance(value, types.ModuleType):
            return
        if _is_code_carrier(value):
            stack.append((value, owner))
            return
        seen.add(id(value))
        found.values.append((name, kind, owner, value))

    for root in roots:
        if root is not None:
            stack.append((root, getattr(root, "__qualname__", type(root).__name__)))
    walked = 0
    while stack and walked < _MAX_WALK:
        obj, owner = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        walked += 1
        if isinstance(obj, functools.partial):
            stack.append((obj.func, owner))
            for index, arg in enumerate(obj.args):
                visit(arg, f"partial argument {index + 1}", "partial argument", owner)
            for key, arg in (obj.keywords or {}).items():
                visit(arg, key, "partial argument", owner)
        elif isinstance(obj, types.MethodType):
            stack.append((obj.__func__, owner))
            visit(obj.__self__, "self", "bound instance", owner)
        elif isinstance(obj, staticmethod | classmethod):
            stack.append((obj.__func__, owner))
        elif isinstance(obj, property):
            for part in (obj.fget, obj.fset, obj.fdel):
                if part is not None:
                    stack.append((part, owner))
        elif isinstance(obj, types.FunctionType):
            if not _by_value(obj):
                continue
            found.functions.append(obj)
            _walk_function(obj, visit)
        elif isinstance(obj, type):
            if not obj.__flags__ & _HEAPTYPE or not _by_value(obj):
                continue  # a C type, or an importable class
            found.classes.append(obj)
            for base in obj.__bases__:
                if base is not object:
                    stack.append((base, owner))
            for key, value in vars(obj).items():
                # Not __module__, __dict__ ...; but its __call__, __init__ ...
                dunder = key.startswith("__") and key.endswith("__")
                if dunder and not _is_code_carrier(value):
                    continue
                name = f"{obj.__qualname__}.{key}"
                visit(value, name, "class attribute", obj.__qualname__)
        elif callable(obj):  # a callable instance: its class travels with it
            stack.append((type(obj), owner))
    return found


def _walk_function(
    func: types.FunctionType, visit: Callable[[Any, str, str, str], None]
) -> None:
    owner = func.__qualname__
    code = func.__code__
    for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell (not yet assigned)
            continue
        visit(value, name, "closure variable", owner)
    namespace = func.__globals__
    for name in global_names(code):
        if name in namespace:
            visit(namespace[name], name, "global", owner)
    defaults = func.__defaults__ or ()
    positional = code.co_varnames[: code.co_argcount]
    named = positional[len(positional) - len(defaults) :]
    for name, value in zip(named, defaults, strict=False):
        visit(value, name, "default argument", owner)
    for name, value in (func.__kwdefaults__ or {}).items():
        visit(value, name, "default argument", owner)


def _is_code_carrier(value: Any) -> bool:
    return isinstance(
        value,
        types.FunctionType
        | types.MethodType
        | functools.partial
        | staticmethod
        | classmethod
        | property
        | type,
    )


def _by_value(obj: Any) -> bool:
    """Whether cloudpickle sends ``obj`` (a function or class) by value."""
    try:
        from cloudpickle import cloudpickle as _cp

        return not _cp._should_pickle_by_reference(obj)
    except Exception:  # a private helper of cloudpickle: fall back to the main rule
        return getattr(obj, "__module__", None) == "__main__"


def check_shippable(func: Any, role: str = "computation") -> None:
    """Raise `SerializationError` if ``func`` cannot be pickled, naming the values it
    captures that cannot (``role`` says what it is: ``"setup function"``)."""
    if not callable(func):
        return
    try:
        serialize.dumps(func)
    except SerializationError as exc:
        cause = exc.__cause__ or exc
        label = getattr(func, "__qualname__", None) or type(func).__name__
        culprits = [
            _describe(name, kind, owner, value, label)
            for name, kind, owner, value in reachable(func).values
            if not _pickles(value)
        ]
        why = (
            f"it uses {', '.join(culprits)}, which cannot be pickled "
            f"({type(cause).__name__}: {cause}); create it inside the function, or "
            "in a setup function, instead"
            if culprits
            else f"{type(cause).__name__}: {cause}"
        )
        raise SerializationError(
            f"{role} {label} cannot be sent to the nodes: {why}"
        ) from None


def _pickles(value: Any) -> bool:
    try:
        serialize.dumps(value)
    except SerializationError:
        return False
    return True


def _describe(name: str, kind: str, owner: str, value: Any, root: str) -> str:
    """``'lock (global, a _thread.lock)'``; the owner is named unless ``root``."""
    cls = type(value)
    module = "" if cls.__module__ == "builtins" else f"{cls.__module__}."
    of = "" if owner == root else f" of {owner}"
    return f"{name} ({kind}{of}, a {module}{cls.__qualname__})"
