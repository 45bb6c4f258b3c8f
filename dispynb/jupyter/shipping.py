"""What a function takes with it to the nodes, and a warning for large captured data.

A computation travels by value (cloudpickle) with everything it refers to: the values
in its closure cells, the globals its code names, its default arguments, and the same
for the functions and classes it uses that travel by value too (those defined in the
notebook or in a script). `reachable` walks that graph without pickling anything;
`large_captures` pickles the function once and, only if that is large, measures each
captured value to name the ones to blame; `warn_large_captures` warns about each
once per process.

A large captured object is sent to every node with the function, again for every
run (each ``%%dispy`` or `Run.map` creates a cluster). Files given in ``depends``
travel once per node and stay in its file store, so the advice is to save the object
to a file, pass it in ``depends`` and load it in a ``setup`` function.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from dispynb.jupyter.display import format_bytes as format_size

__all__ = [
    "LARGE_CAPTURE",
    "Capture",
    "LargeCaptureWarning",
    "Reached",
    "code_objects",
    "large_captures",
    "pickled_size",
    "reachable",
    "warn_large_captures",
]

#: Bytes (pickled) from which a captured object is reported.
LARGE_CAPTURE = 1 << 20

#: At most this many functions and classes are walked from one root.
_MAX_WALK = 2000

#: ``Py_TPFLAGS_HEAPTYPE``: set for classes defined in Python (never sent by value
#: otherwise).
_HEAPTYPE = 1 << 9


class LargeCaptureWarning(UserWarning):
    """A function sent to the nodes captures a large object."""


@dataclasses.dataclass(frozen=True)
class Capture:
    """A value a shipped function captures, with its pickled size.

    Attributes
    ----------
    name:
        How the code refers to it: ``"table"``, ``"Model.weights"``.
    kind:
        ``"global"``, ``"closure variable"``, ``"default argument"`` or
        ``"class attribute"``.
    owner:
        Qualified name of the function (or class) that refers to it.
    size:
        Bytes when pickled as dispynb sends it.
    """

    name: str
    kind: str
    owner: str
    size: int

    def describe(self, root: str = "") -> str:
        """``'big (global, 2.3 MB)'``; the owner is named unless it is ``root``."""
        of = "" if self.owner == root else f" of {self.owner}"
        return f"{self.name} ({self.kind}{of}, {format_size(self.size)})"


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
                if key.startswith("__") and key.endswith("__"):
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
    for name in _global_names(code):
        if name in namespace:
            visit(namespace[name], name, "global", owner)
    defaults = func.__defaults__ or ()
    positional = code.co_varnames[: code.co_argcount]
    named = positional[len(positional) - len(defaults) :]
    for name, value in zip(named, defaults, strict=False):
        visit(value, name, "default argument", owner)
    for name, value in (func.__kwdefaults__ or {}).items():
        visit(value, name, "default argument", owner)


def _global_names(code: types.CodeType) -> list[str]:
    """Names the code (and the code nested in it) may read as globals, in order."""
    names: dict[str, None] = {}
    for each in code_objects(code):
        names.update(dict.fromkeys(each.co_names))
    return list(names)


def code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and every code object nested in it (functions, lambdas,
    comprehensions, class bodies)."""
    stack = [code]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))


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


def pickled_size(obj: Any) -> int | None:
    """Bytes ``obj`` takes when dispynb pickles it; None if it cannot be pickled.

    Large buffers (bytes, NumPy arrays, DataFrame blocks) are measured without being
    copied: they leave the pickle out-of-band.
    """
    from dispynb.errors import SerializationError
    from dispynb.protocol import serialize

    try:
        buffers = serialize.dumps(obj)
    except SerializationError:
        return None
    return sum(memoryview(b).nbytes for b in buffers)


def large_captures(
    func: Any, threshold: int = LARGE_CAPTURE
) -> tuple[int | None, list[Capture]]:
    """``(pickled size of func, its large captured values, largest first)``.

    ``func`` is pickled once; only when it takes at least ``threshold`` bytes is each
    captured value pickled to find the culprits: those of ``threshold`` bytes or
    more, else (many medium values adding up) the three largest.
    """
    from dispynb.protocol import serialize

    serialize.ship_by_value(func)  # as JobCluster will, so that the size is right
    total = pickled_size(func)
    if total is None or total < threshold:
        return total, []
    found = reachable(func)
    captures = []
    for name, kind, owner, value in found.values:
        size = pickled_size(value)
        if size is not None:
            captures.append(Capture(name, kind, owner, size))
    captures.sort(key=lambda c: c.size, reverse=True)
    large = [c for c in captures if c.size >= threshold]
    return total, large or captures[:3]


_warned: set[tuple[str, str, str]] = set()
_warned_lock = threading.Lock()


def warn_large_captures(
    func: Any,
    role: str = "computation",
    threshold: int = LARGE_CAPTURE,
    stacklevel: int = 2,
) -> list[Capture]:
    """Warn (`LargeCaptureWarning`) if ``func`` captures large objects.

    The warning points at the function's definition (for a function; otherwise
    ``stacklevel`` frames up, as `warnings.warn`). Each (function, object) pair is
    reported once per process. Returns the captures warned about now.
    """
    if isinstance(func, str) or func is None:
        return []  # a program, or nothing
    total, captures = large_captures(func, threshold)
    if not captures or total is None:
        return []
    label = getattr(func, "__qualname__", None) or type(func).__name__
    new = []
    with _warned_lock:
        for capture in captures:
            key = (getattr(func, "__module__", "") or "", label, capture.name)
            if key not in _warned:
                _warned.add(key)
                new.append(capture)
    if not new:
        return []
    message = large_capture_message(label, role, total, new)
    code = getattr(func, "__code__", None)
    if isinstance(code, types.CodeType):
        # Point at the function's definition (its cell), not at dispynb's code.
        warnings.warn_explicit(
            message,
            LargeCaptureWarning,
            code.co_filename,
            code.co_firstlineno,
            module=getattr(func, "__module__", None) or "__main__",
        )
    else:
        warnings.warn(message, LargeCaptureWarning, stacklevel=stacklevel + 1)
    return new


def large_capture_message(
    label: str, role: str, total: int, captures: list[Capture]
) -> str:
    """The text of the warning (see `warn_large_captures`)."""
    what = ", ".join(c.describe(label) for c in captures)
    first = captures[0].name
    return (
        f"{label} ({role}) takes {format_size(total)} pickled because it captures "
        f"{what}; that is sent to every node with the function, again on every run. "
        f"To send {first} once per node, save it to a file, pass the file in "
        f"depends=[...] (%%dispy --depends) and load it into a global in a setup "
        f"function (setup=..., %%dispy --setup) that the jobs use; or pass each job "
        f"only the part it needs, as an argument."
    )
