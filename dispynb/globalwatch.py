"""Globals of a computation that the program changes after the cluster sent it.

A function sent by value takes the globals it reads as they are when it is pickled
(``JobCluster()``). A script that sets one afterwards (``PARAM = p`` in a loop of
``submit``), or defines it only then, gets jobs that see the old value, or a
``NameError`` for a name it defines. `GlobalWatch` remembers which object each such
global named when the computation was sent, and `GlobalWatch.changed` says, once,
which one the program has rebound since, so that `JobCluster.submit` can warn.
"""

from __future__ import annotations

import builtins
import dis
import types
from typing import Any

from dispynb.captures import code_objects, reachable

__all__ = ["GlobalWatch"]

#: Opcodes that read a global (a module-level name of the function's module).
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
#: Opcodes that set or delete one.
_STORES = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL"})


#: A global's value when it was not defined.
_MISSING = object()
#: Values compared by value: cheap to keep, and often set again to the same value.
_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})


class GlobalWatch:
    """The globals that the functions sent by value read, and what each was."""

    def __init__(self, computation: Any, *setters: Any) -> None:
        """Watch what ``computation`` reads; ``setters`` (setup, cleanup) may set
        globals on the node, which are not this program's."""
        # (function name, global name, its module's namespace, what it was then: a
        # scalar in a 1-tuple, compared by value; else its id; _MISSING if undefined)
        self._watched: list[tuple[str, str, dict[str, Any], object]] = []
        self._warned = False
        if not callable(computation):
            return  # a program: nothing sent by value
        try:
            functions = reachable(computation).functions
            others = reachable(*(f for f in setters if callable(f))).functions
        except Exception:  # a watch is advice: never cost the cluster its start
            return
        # Globals a function sent sets (dispy's setup: ``global data; data = ...``)
        # are the node's own: the jobs read those, whatever this program does.
        set_there = {
            name
            for function in (*functions, *others)
            for name in _globals(function, _STORES)
        }
        for function in functions:
            namespace = function.__globals__
            for name in _globals(function, _LOADS):
                if name in set_there:
                    continue
                if name in namespace:
                    value = namespace[name]
                    if isinstance(value, types.ModuleType):
                        continue  # sent by reference: the node imports it
                    # A scalar set again to the same value is no change; other
                    # values are not kept alive for the comparison.
                    then = (value,) if type(value) in _SCALARS else id(value)
                    self._watched.append((function.__name__, name, namespace, then))
                elif not hasattr(builtins, name):
                    self._watched.append((function.__name__, name, namespace, _MISSING))

    def changed(self) -> str | None:
        """A warning naming the first global rebound (or defined) since the
        functions were sent; None if there is none, and after the first warning."""
        if self._warned:
            return None
        for function, name, namespace, then in self._watched:
            now = namespace.get(name, _MISSING)
            if now is _MISSING:
                continue  # still undefined: the job's NameError says why
            if _same(now, then):
                continue
            self._warned = True
            if then is _MISSING:
                was, jobs = "was not defined", "do not have it (NameError)"
            else:
                was, jobs = "had another value", "see the value it had then"
            return (
                f"{function} reads the global {name}, which {was} when JobCluster() "
                f"sent {function}: its jobs {jobs}; set {name} before creating the "
                "cluster, or pass it to submit as an argument"
            )
        return None


def _same(now: object, then: object) -> bool:
    """Whether ``now`` is what `GlobalWatch` recorded as ``then``."""
    if isinstance(then, tuple):  # a scalar: equal, and of the same type
        return type(now) is type(then[0]) and (now is then[0] or now == then[0])
    return then is not _MISSING and id(now) == then


def _globals(function: types.FunctionType, opnames: frozenset[str]) -> list[str]:
    """The global names that ``function``'s code (and the code nested in it) reads
    (``opnames`` `_LOADS`) or sets (`_STORES`), in order."""
    names: dict[str, None] = {}
    for each in code_objects(function.__code__):
        for instruction in dis.get_instructions(each):
            if instruction.opname in opnames and isinstance(instruction.argval, str):
                names[instruction.argval] = None
    return list(names)
