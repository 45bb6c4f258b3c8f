"""`dispynb_executor`: the computation of every `dispynb.executor.Executor`, as it
runs on the nodes (the client's side is `dispynb.executor`).

Each job carries the function (pickled by value) and its calls as columns; the
runner unpickles the function once per worker (kept by the digest of its bytes),
makes the calls, runs an ``async def`` function's coroutine to completion, and
sends back the values and, apart, each call that raised (its exception pickled on
its own, with its traceback). `_initialize` is the executor's ``setup`` when it
was given an initializer.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import io
import itertools
import pickle
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from dispynb import objects
from dispynb.jobenv import format_exception, stopped_by_node

__all__ = ["Failure", "Outcomes", "dispynb_executor"]

#: A call that raised: ``(exception pickled, or None if it cannot be, traceback,
#: name, message)``; pickled apart, so that one the client cannot unpickle (its
#: class in a module only the node has) costs neither its traceback nor the
#: other calls' values. (A node of an older dispynb sends the exception itself.)
Failure = tuple[bytes | BaseException | None, str, str, str]

#: What a node sends back for a job's calls: their values (None for a call that
#: raised) and the failures by the index of their call.
Outcomes = tuple[list[Any], dict[int, Failure]]

#: Functions a node worker keeps unpickled (by digest), and the largest kept.
_CACHE_ENTRIES = 32
_CACHE_MAX_BYTES = 1 << 20
_fn_cache: collections.OrderedDict[str, Callable[..., Any]] = collections.OrderedDict()
#: What an ``async def`` function returns (a global: checked after every call).
_COROUTINE = types.CoroutineType
#: What the executor's initializer printed on the node (stdout, stderr): written
#: into the output of the first job of each process that ran it or forked after.
_init_output: list[tuple[str, str]] = []
#: The globals the initializer bound (``global model; model = ...``), and the name
#: of the module whose globals they are. A function sent by value comes with a
#: globals dict of its own, so a call's function would not see them, where a
#: `ProcessPoolExecutor` worker's calls do: each call's function of that module
#: gets them in its globals (`_with_init_globals`).
_init_globals: tuple[str | None, dict[str, Any]] = (None, {})
_UNSET = object()


def dispynb_executor(
    key: str,
    blob: bytes | tuple[str, bytes],
    count: int,
    columns: tuple[Sequence[Any], ...],
    kwargs: dict[str, Any] | None = None,
) -> Outcomes:
    """The computation of every executor (runs on the nodes): make ``count`` calls
    ``fn(*args, **kwargs)`` of the function pickled in ``blob`` (``key`` is its
    digest), ``args`` read across ``columns`` (none: no arguments); a call that
    raises does not stop the next ones, one that returns a coroutine (an ``async
    def`` function) has it run to its end."""
    fn = _fn_cache.get(key)
    if fn is None:
        if type(blob) is tuple:  # a large function put once (Executor._carrier)
            digest, blob = blob
            # For this job only, as a large function carried by its job (not
            # cached below either): kept, each one a map put stayed in this
            # worker's memory until the executor closed.
            objects.unload(digest)
        fn = _with_init_globals(cloudpickle.loads(blob))
        if len(blob) <= _CACHE_MAX_BYTES:
            _fn_cache[key] = fn
            if len(_fn_cache) > _CACHE_ENTRIES:
                _fn_cache.popitem(last=False)
    else:
        _fn_cache.move_to_end(key)
    if _init_output:
        _write_init_output()
    values: list[Any] = []
    failures: dict[int, Failure] = {}
    calls = zip(*columns, strict=True) if columns else itertools.repeat((), count)
    named = kwargs or {}
    for index, args in enumerate(calls):
        try:
            value = fn(*args, **named)
            if type(value) is _COROUTINE:
                # An async def function: run it here, as Dask's workers do (a
                # coroutine could only fail to pickle, as in ProcessPoolExecutor).
                import asyncio  # only then: node workers need not load it

                value = asyncio.run(value)
            values.append(value)
        except BaseException as exc:  # the caller's to see (SystemExit too)
            if stopped_by_node(exc):  # a cancel, job_timeout: the job ends here
                raise
            # KeyboardInterrupt the call raised too: ProcessPoolExecutor's
            # workers catch BaseException, its result() raises it.
            # Without this frame when there is another: from the user's function.
            tb = exc.__traceback__
            tb = tb.tb_next or tb if tb is not None else None
            if tb is not None and _in_asyncio_run(tb):  # an async function's
                tb = _coroutine_frames(tb)
            text = format_exception(exc, tb)
            exc.__traceback__ = None
            carried, why = _pickled_exception(exc)  # None: RemoteError alone
            values.append(None)
            message = _message(exc)
            failures[index] = (carried, text + why, type(exc).__name__, message)
    return values, failures


def _in_asyncio_run(tb: types.TracebackType) -> bool:
    """Whether ``tb``'s frame is ``asyncio.run`` (running a call's coroutine)."""
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and tb.tb_frame.f_code is asyncio.run.__code__


def _coroutine_frames(tb: types.TracebackType) -> types.TracebackType:
    """``tb`` (from ``asyncio.run`` of a call's coroutine) from its first
    coroutine's frame, without the event loop's; all of it if there is none
    (asyncio's own error)."""
    at: types.TracebackType | None = tb
    while at is not None and not at.tb_frame.f_code.co_flags & inspect.CO_COROUTINE:
        at = at.tb_next
    return at or tb


def _message(exc: BaseException) -> str:
    """``str(exc)``, or what a traceback shows when that raises (the runner
    must go on to the next calls)."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


def _pickled_exception(exc: BaseException) -> tuple[bytes | None, str]:
    """``(exc pickled, "")`` if it pickles and unpickles here, else ``(None, the
    line saying why it cannot come back as itself, and how to let it)``. An
    exception class whose ``__init__`` wants other arguments than its ``args``
    pickles but does not unpickle."""
    try:
        blob = cloudpickle.dumps(exc)
        pickle.loads(blob)
    except Exception as error:
        return None, (
            f"[dispynb: the {type(exc).__name__} raised cannot come back as itself "
            f"({type(error).__name__}: {error}), so it is raised as this "
            "RemoteError: an exception travels as its class called with its args, "
            "and its __dict__; give every argument of its __init__ to "
            "super().__init__(), keep no attribute that cannot be pickled, or "
            "define __reduce__]\n"
        )
    return blob, ""


def _initialize(initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> int:
    """``setup`` of an executor given ``initializer`` (runs on each node). What it
    prints or warns goes to the client with the first job of each worker
    process, as a `ProcessPoolExecutor` worker's initializer prints to the
    script's terminal, where its warnings name their file and line (the node
    has only ``<dynamic-code>``); if it raises, to the node's own streams."""
    out, err = io.StringIO(), io.StringIO()
    namespace = _globals_of(initializer)
    before = dict(namespace or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            initializer(*initargs)
    except BaseException as exc:
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())
        # From the initializer's frame on, as the pool shows it: not this one's
        # (a bare raise adds no frame).
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
            exc.__traceback__ = exc.__traceback__.tb_next
        raise
    if out.tell() or err.tell():
        _init_output[:] = [(out.getvalue(), err.getvalue())]
    if namespace:
        global _init_globals
        bound = {
            k: v
            for k, v in namespace.items()
            # The user's, not Python's (__warningregistry__ if it warned).
            if before.get(k, _UNSET) is not v
            and not (k.startswith("__") and k.endswith("__"))
        }
        _init_globals = (namespace.get("__name__"), bound)
    return 0


def _globals_of(fn: Any) -> dict[str, Any] | None:
    """The globals of a function (or of a `functools.partial`'s), else None."""
    fn = getattr(fn, "func", fn)
    namespace = getattr(fn, "__globals__", None)
    return namespace if isinstance(namespace, dict) else None


def _with_init_globals(fn: Any) -> Any:
    """``fn``, with what the initializer bound in its module's globals (see
    `_init_globals`); the initializer's values win over those ``fn`` was sent
    with, as the pool's worker's module keeps what its initializer set."""
    module, bound = _init_globals
    namespace = _globals_of(fn)
    if bound and namespace is not None and namespace.get("__name__") == module:
        namespace.update(bound)
    return fn


def _write_init_output() -> None:
    """Write what the initializer printed into this job's output (once per
    process: a worker forked after it has its own copy to write)."""
    out, err = _init_output.pop()
    sys.stdout.write(out)
    sys.stderr.write(err)
