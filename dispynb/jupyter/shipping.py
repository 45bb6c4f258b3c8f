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
import inspect
import linecache
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

from dispynb.captures import Reached, code_objects, reachable
from dispynb.jupyter.display import format_bytes as format_size
from dispynb.tracebacks import cell_name

__all__ = [
    "LARGE_CAPTURE",
    "Capture",
    "LargeCaptureWarning",
    "Reached",
    "code_objects",
    "large_captures",
    "pickled_size",
    "reachable",
    "return_problem",
    "source_name",
    "warn_large_captures",
]

#: Bytes (pickled) from which a captured object is reported.
LARGE_CAPTURE = 1 << 20


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
            source_name(code.co_filename),
            code.co_firstlineno,
            module=getattr(func, "__module__", None) or "__main__",
        )
    else:
        warnings.warn(message, LargeCaptureWarning, stacklevel=stacklevel + 1)
    return new


def source_name(filename: str) -> str:
    """What a warning names the file ``filename``: ``Cell In[3]`` for a cell, as
    IPython's tracebacks do (its file is ``/tmp/ipykernel_12/345.py``), else the
    file. A cell's lines are kept under that name too: the warning shows its line."""
    cell = cell_name(filename)
    if cell is None:
        return filename
    lines = linecache.getlines(filename)
    if lines and cell not in linecache.cache:
        # No modification time: `linecache.checkcache` keeps it (no such file).
        linecache.cache[cell] = (sum(map(len, lines)), None, lines, cell)
    return cell


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


def return_problem(func: Callable[..., Any]) -> str | None:
    """Why no job of ``func`` could send its result back, if it is an ``async def``
    or a generator function: each job returned a coroutine or a generator, which
    failed as 'cannot be pickled' (a coroutine with a 'never awaited' warning naming
    dispynb's file), once per job. None for any other callable."""
    name = getattr(func, "__name__", "the function")
    if inspect.iscoroutinefunction(func):
        return (
            f"{name} is an async def function: each job would return a coroutine, "
            "which runs only when awaited; define it with def and run what it "
            "awaits inside it (return asyncio.run(main(x)))"
        )
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        return (
            f"{name} yields: each job would return a generator, which cannot be "
            "sent back; return a list instead (return list(...))"
        )
    return None
