"""Pickling of computations, arguments and results (cloudpickle, protocol 5).

Functions, closures and classes from ``__main__``, a notebook cell or a module the node
cannot import travel by value. Large buffers (bytearray, NumPy arrays...) leave the
pickle as protocol-5 out-of-band buffers, so they are framed and sent without copies.
Only ever call `loads` on data from an authenticated peer.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib
import io
import pickle
import signal
import sys
import types
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import cloudpickle

from dispynb.errors import SerializationError
from dispynb.protocol.framing import Buffer
from dispynb.protocol.packages import require

require(cloudpickle, "dumps")

_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})
#: `_PLAIN` but ``bytes`` (large ones go out of band).
_SCALAR = _PLAIN - {bytes}


def dumps(obj: Any, kinds: list[str] | None = None) -> list[Buffer]:
    """Pickle ``obj`` into ``[pickle, *out_of_band_buffers]``.

    ``kinds``, if given, receives one letter per out-of-band buffer: ``"b"`` for one
    that becomes a ``bytes`` object when unpickled, ``"a"`` a ``bytearray``, ``"p"``
    anything else (a NumPy array's memory): a receiver that assembles a large buffer
    in place can then build the final object directly. Raises `SerializationError`
    naming the type when ``obj`` cannot be pickled.
    """
    buffers: list[Buffer] = []
    try:
        if _is_plain(obj):
            main = pickle.dumps(obj, protocol=5)
        else:
            main = _dumps_by_value(obj, buffers, kinds)
    except Exception as exc:
        if _from_signal_handler(exc):
            raise
        raise SerializationError(
            f"cannot pickle {_describe(obj)}: {type(exc).__name__}: {exc}"
        ) from exc
    return [main, *(memoryview(b).cast("B") for b in buffers)]


def _from_signal_handler(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a Python signal handler that ran meanwhile (a
    timeout by ``signal.alarm`` whose handler raises): the user's to catch as
    raised, not a pickling error."""
    handlers: set[types.CodeType] = set()
    for signum in signal.valid_signals():
        handler = signal.getsignal(signum)
        code = getattr(getattr(handler, "__func__", handler), "__code__", None)
        if code is not None:
            handlers.add(code)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in handlers:
            return True
        tb = tb.tb_next
    return False


def loads(
    buffers: list[Buffer] | list[memoryview], allowed: AllowList | None = None
) -> Any:
    """Unpickle what `dumps` produced. Only for data from an authenticated peer.

    With ``allowed``, only the globals it names can be loaded (see `AllowList`);
    anything else raises `SerializationError` naming the global and how to allow it.
    """
    if not buffers:
        raise SerializationError("no pickle data")
    if allowed is not None:
        try:
            return _RestrictedUnpickler(buffers[0], buffers[1:], allowed).load()
        except SerializationError:
            raise
        except Exception as exc:
            if _from_signal_handler(exc):
                raise
            raise SerializationError(
                f"cannot unpickle data: {type(exc).__name__}: {exc}"
            ) from exc
    try:
        if len(buffers) == 1:  # no out-of-band buffer, so no out-of-band bytearray
            return pickle.loads(buffers[0])  # authenticated peer only
        return _Unpickler(buffers[0], buffers[1:]).load()  # authenticated peer only
    except Exception as exc:
        if _from_signal_handler(exc):
            raise
        raise SerializationError(
            f"cannot unpickle data: {type(exc).__name__}: {exc}"
        ) from exc


def unpicklable_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, SerializationError] | None:
    """The first argument of a call ``(args, kwargs)`` that cannot be pickled, as
    ``("argument 2", error)`` or ``("keyword argument 'y'", error)``; None if each
    pickles on its own. For error messages: `dumps` of the whole call names only
    the type of the value that failed, not which argument holds it."""
    named = [(f"argument {i + 1}", value) for i, value in enumerate(args)]
    named += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for name, value in named:
        try:
            dumps(value)
        except SerializationError as exc:
            return name, exc
    return None


def unsendable_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception, where: str
) -> str:
    """Why a job whose arguments failed to pickle (``error``) cannot be sent to
    ``where`` ("a node", "a Dask worker"...), the same on every engine: the
    argument that fails (`cannot_send_argument`)."""
    found = unpicklable_argument(args, kwargs)
    if found is None:
        return f"job arguments cannot be sent to {where}: {error}"
    return cannot_send_argument(*found, where)


def cannot_send_argument(name: str, exc: Exception, where: str) -> str:
    """Why job argument ``name`` (``"argument 2"``), which failed to pickle with
    ``exc``, cannot be sent to ``where``, and what to send instead."""
    return (
        f"job {name} cannot be sent to {where}: {exc}; send what it is made from "
        "instead (a file's path, not the open file; a list, not a generator) and "
        "make it in the job"
    )


def unpicklable_result(result: Any, exc: Exception) -> str:
    """What a job whose ``result`` failed to pickle (``exc``) reports, the same on
    dispynb's nodes and on every engine: the result's type, the part of it that
    cannot be pickled (``result['guard'] is a 'lock' ...``), the error, and what
    to return instead."""
    kind = type(result).__qualname__
    path, culprit = _find_unpicklable(result, "result", 0)
    where = ""
    if path != "result":
        where = f"; {path} is a {type(culprit).__qualname__!r} that cannot be pickled"
    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    instead = (
        "return what it is made from instead (a list, not a generator; a file's "
        "path, not the open file)"
    )
    if isinstance(culprit, types.CoroutineType):
        instead = (
            "it comes from calling an async function: submit a function that runs "
            "it where it is made (return asyncio.run(...))"
        )
    elif isinstance(culprit, types.AsyncGeneratorType):  # asyncio.run refuses it
        instead = (
            "it comes from calling an async generator function: return a list of "
            "what it yields instead (in an async def: return [x async for x in "
            "...], run with asyncio.run)"
        )
    return (
        f"result of type {kind!r} cannot be pickled{where}: "
        f"{type(cause).__name__}: {str(cause).rstrip()}; {instead}\n"
    )


def _find_unpicklable(value: Any, path: str, depth: int) -> tuple[str, Any]:
    """The deepest part of ``value`` that does not pickle, and its path."""
    if depth > 32:
        return path, value
    items: list[tuple[str, Any]]
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            items.append((f"{path} key {key!r}", key))
            items.append((f"{path}[{key!r}]", item))
    elif isinstance(value, list | tuple):
        items = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, set | frozenset):
        items = [(f"an element of {path}", item) for item in value]
    elif isinstance(getattr(value, "__dict__", None), dict) and not isinstance(
        value, type
    ):
        items = [(f"{path}.{name}", item) for name, item in vars(value).items()]
    else:
        return path, value
    for sub_path, item in items:
        try:
            dumps(item)
        except Exception:
            return _find_unpicklable(item, sub_path, depth + 1)
    return path, value


# --- Out-of-band bytes and bytearrays -------------------------------------------
# Stock pickle writes bytes and bytearrays in-band even with protocol 5 and a
# buffer_callback (only PickleBuffer objects, as NumPy arrays produce, go out-of-band),
# and the C pickler never calls reducer_override for them. Large ones are therefore
# swapped for a PickleBuffer through persistent_id (called for every object) and
# rebuilt by persistent_load; one seen again is sent as its index, so shared
# references stay shared. Buffers under _OOB_MIN stay in-band, which also bounds the
# number of frames.

#: Smallest buffer sent out-of-band; smaller ones are cheaper inside the pickle.
_OOB_MIN = 64 * 1024
_BINARY: dict[type, str] = {bytes: "b", bytearray: "a"}


class _ByValuePickler(cloudpickle.Pickler):  # type: ignore[misc]  # untyped
    """cloudpickle's pickler, sending Python's open for the notebook's, and a
    function of the notebook's cached with ``functools.lru_cache`` by value."""

    def __init__(self, file: io.BytesIO, **options: Any) -> None:
        super().__init__(file, protocol=5, **options)
        self._notebook_open = _notebook_open()

    def reducer_override(self, obj: Any) -> Any:
        if obj is self._notebook_open and obj is not None:
            # Python's own open on the node: IPython's wrapper (which only refuses
            # file descriptors 0-2) would travel by value with a function of the
            # notebook, and show in its tracebacks as a frame of IPython's.
            return getattr, (builtins, "open")
        if type(obj) is _CACHED:
            # Pickled by name (__main__.fib) it is found on no node: its function
            # goes by value and is cached there anew, its cache left behind.
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is not None and travels_by_value(wrapped):
                params = obj.cache_parameters()
                return _cache, (wrapped, params["maxsize"], params["typed"])
        elif type(obj) is types.FunctionType and _dispatches(obj):
            # functools.singledispatch: its cache (a WeakKeyDictionary in the
            # function's closure) does not pickle; its registry goes, and the
            # function is made again on the node.
            registry = obj.registry.items()  # type: ignore[attr-defined]
            ways = [(kind, impl) for kind, impl in registry if kind is not object]
            return _singledispatch, (obj.__dict__["__wrapped__"], ways)
        elif type(obj) is types.ModuleType and obj.__name__ in _HELPER_MODULES:
            # A helper module named as a whole (``import helpers``) goes by name,
            # as before it was shipped for its functions: by value, all its
            # globals (data too) would travel with every job.
            return importlib.import_module, (obj.__name__,)
        elif type(obj) is functools.cached_property and travels_by_value(obj.func):
            # A class of the notebook's travels by value, its attributes with it:
            # on Python 3.11 a cached_property holds a lock, which does not pickle.
            return _cached_property, (obj.func, obj.attrname)
        return super().reducer_override(obj)


#: The type of the functions ``functools.lru_cache`` and ``functools.cache`` make.
_CACHED = type(functools.lru_cache(maxsize=None)(len))


def _cache(func: Any, maxsize: int | None, typed: bool) -> Any:
    """``func`` cached as on the client (`_ByValuePickler`)."""
    return functools.lru_cache(maxsize=maxsize, typed=typed)(func)


def _dispatches(func: types.FunctionType) -> bool:
    """Whether ``func`` is a ``functools.singledispatch`` function that travels by
    value (its registry and its ``dispatch`` in its ``__dict__``)."""
    names = func.__dict__
    return (
        "registry" in names
        and "dispatch" in names
        and isinstance(names["registry"], types.MappingProxyType)
        and travels_by_value(names.get("__wrapped__"))
    )


def _singledispatch(func: Any, ways: list[tuple[type, Any]]) -> Any:
    """``func`` dispatching as on the client (`_ByValuePickler`): its
    implementation for each type of ``ways``."""
    made = functools.singledispatch(func)
    for kind, impl in ways:
        made.register(kind, impl)
    return made


def _cached_property(func: Any, name: str | None) -> Any:
    """A ``functools.cached_property`` of ``func`` named ``name`` in its class (set
    by its class statement, which the unpickled class does not run again)."""
    made = functools.cached_property(func)
    made.attrname = name
    return made


def dumps_in_band(obj: Any) -> bytes:
    """``obj`` pickled by value in one ``bytes`` (no out-of-band buffers), as
    `dumps` pickles it otherwise: for the Executor's functions, cached by digest."""
    file = io.BytesIO()
    _ByValuePickler(file).dump(obj)
    return file.getvalue()


class _Pickler(_ByValuePickler):
    def __init__(
        self, file: io.BytesIO, buffers: list[Buffer], kinds: list[str] | None
    ) -> None:
        super().__init__(file, buffer_callback=self._buffer)
        self._out = buffers
        self._kinds = kinds
        self._kind = "p"  # of the next buffer: set by persistent_id for its own
        self._seen: dict[int, int] = {}

    def _buffer(self, buf: pickle.PickleBuffer) -> bool:
        kind, self._kind = self._kind, "p"
        if memoryview(buf).nbytes < _OOB_MIN:
            return True  # in-band
        self._out.append(buf.raw())
        if self._kinds is not None:
            self._kinds.append(kind)
        return False

    def persistent_id(self, obj: Any) -> Any:
        kind = _BINARY.get(type(obj))
        if kind is None or len(obj) < _OOB_MIN:
            return None
        index = self._seen.get(id(obj))
        if index is not None:
            return index
        self._seen[id(obj)] = len(self._seen)
        self._kind = kind
        return kind, pickle.PickleBuffer(obj)


def _notebook_open() -> Any:
    """The ``open`` IPython puts in a notebook's namespace, if IPython is loaded."""
    shell = sys.modules.get("IPython.core.interactiveshell")
    return getattr(shell, "_modified_open", None)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: Buffer, buffers: list[Buffer] | list[memoryview]) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self._seen: list[bytes | bytearray] = []

    def persistent_load(self, pid: Any) -> bytes | bytearray:
        if isinstance(pid, int):
            return self._seen[pid]
        kind, buffer = pid
        if kind == "b":
            value: bytes | bytearray = bytes(buffer)
        elif type(buffer) is bytearray:
            value = buffer  # a whole buffer assembled for us (streamed): no copy
        else:
            value = bytearray(buffer)
        self._seen.append(value)
        return value


class AllowList:
    """The globals a restricted unpickler may load (``result_types``).

    Entries are ``"module.qualname"`` (one class or function) or ``"module.*"`` (all of
    a module's top-level names). Plain values (numbers, strings, bytes, lists, tuples,
    dicts, None, booleans) need no entry, nor do the harmless standard types in
    `SAFE_GLOBALS`.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.names: frozenset[str] = frozenset(SAFE_GLOBALS) | frozenset(
            e for e in entries if not e.endswith(".*")
        )
        self.modules: frozenset[str] = frozenset(
            e[:-2] for e in entries if e.endswith(".*")
        )

    def allows(self, module: str, name: str) -> bool:
        """Whether ``module.name`` may be loaded."""
        return f"{module}.{name}" in self.names or (
            module in self.modules and "." not in name
        )


#: Standard types a result may hold without being listed in ``result_types``.
SAFE_GLOBALS = (
    "builtins.set",
    "builtins.frozenset",
    "builtins.bytearray",
    "builtins.complex",
    "builtins.range",
    "builtins.slice",
    "collections.OrderedDict",
    "collections.deque",
    "collections.Counter",
    "datetime.date",
    "datetime.datetime",
    "datetime.time",
    "datetime.timedelta",
    "datetime.timezone",
    "decimal.Decimal",
    "fractions.Fraction",
    "uuid.UUID",
    "copyreg._reconstructor",
    "builtins.object",
)


class _RestrictedUnpickler(_Unpickler):
    def __init__(
        self,
        data: Buffer,
        buffers: list[Buffer] | list[memoryview],
        allowed: AllowList,
    ) -> None:
        super().__init__(data, buffers)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if self._allowed.allows(module, name):
            return super().find_class(module, name)
        raise SerializationError(
            f"the result refers to {module}.{name}, which result_types does not "
            f"allow: add {f'{module}.{name}'!r} (or {f'{module}.*'!r}) to "
            "result_types if the nodes may send it"
        )


def _dumps_by_value(
    obj: Any, buffers: list[Buffer], kinds: list[str] | None = None
) -> bytes:
    file = io.BytesIO()
    _Pickler(file, buffers, kinds).dump(obj)
    return file.getvalue()


# --- end of out-of-band bytes and bytearrays -------------------------------------


def ship_by_value(*objs: Any) -> None:
    """Make cloudpickle send the modules defining ``objs`` by value.

    A function or class from a script's own module (not the standard library, not an
    installed package) cannot be imported on a node, so its module is pickled by value,
    as ``__main__`` already is.
    """
    seen: set[int] = set()
    for obj in objs:
        try:
            if obj in _SHIPPED:  # walked already (an executor's every submit)
                continue
            _SHIPPED.add(obj)
        except TypeError:  # not weakly referenced, or not hashable: walk it
            pass
        _ship_with_helpers(obj, seen, top=True)


#: The functions and classes `ship_by_value` has walked (with their helpers).
_SHIPPED: weakref.WeakSet[Any] = weakref.WeakSet()


def _ship_with_helpers(obj: Any, seen: set[int], top: bool = False) -> None:
    """`ship_by_value` for ``obj``, then for the script's functions and classes
    its code names (from a helper module beside the script, or in its package,
    that no node can import either, as ProcessPoolExecutor's workers can)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    obj = getattr(obj, "__func__", obj)  # a bound method: its function
    if isinstance(obj, functools.partial):
        _ship_with_helpers(obj.func, seen, top)
        return
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is None or _is_installed(module):
        return
    if not top and module.__name__.partition(".")[0] in _ON_EVERY_NODE:
        return  # named by the script's code: imported on the node
    if module.__name__ != "__main__":
        if top:
            _HELPER_MODULES.discard(module.__name__)
        elif module.__name__ not in cloudpickle.list_registry_pickle_by_value():
            _HELPER_MODULES.add(module.__name__)
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:  # a module cloudpickle cannot take by value (builtins)
            return
    if isinstance(obj, type):
        for value in list(vars(obj).values()):
            _ship_with_helpers(getattr(value, "__func__", value), seen)
        return
    code = getattr(obj, "__code__", None)
    names = getattr(obj, "__globals__", None)
    if isinstance(code, types.CodeType) and isinstance(names, dict):
        for name in global_names(code):
            if name in names and _may_be_helper(names[name]):
                _ship_with_helpers(names[name], seen)
        for cell in getattr(obj, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if _may_be_helper(cell.cell_contents):
                    _ship_with_helpers(cell.cell_contents, seen)
    elif callable(obj) and not isinstance(obj, types.BuiltinFunctionType):
        _ship_with_helpers(type(obj), seen)  # an instance with __call__


#: The modules shipped by value only for a function or class of theirs that
#: another uses (`_ship_with_helpers`): the module object itself goes by name.
_HELPER_MODULES: set[str] = set()

#: Packages every node has (however this client has them: a checkout too).
_ON_EVERY_NODE = frozenset({"dispynb", "nodeserver"})


def _may_be_helper(value: Any) -> bool:
    """Whether ``value`` may be code of the script's to ship by value. Not a
    module (``import helpers``): one shipped by value carries all its globals,
    data too, in every job; it is imported on the node (``depends``)."""
    return isinstance(value, (types.FunctionType, type, functools.partial))


def global_names(code: types.CodeType) -> list[str]:
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


def travels_by_value(obj: Any) -> bool:
    """Whether cloudpickle sends ``obj`` (a function, class or `functools.partial`)
    as compiled code rather than by name: defined in ``__main__`` or in a module of
    the script's (`ship_by_value`), not in the standard library or an installed
    package that the node imports."""
    obj = getattr(obj, "func", obj)  # functools.partial: its function
    if not callable(obj):
        return False
    name = getattr(obj, "__module__", None)
    module = sys.modules.get(name or "")
    if module is None:
        return name is not None  # a module of its own no node can import
    return module.__name__ == "__main__" or not _is_installed(module)


def _is_installed(module: types.ModuleType) -> bool:
    path: str | None = getattr(module, "__file__", None)
    if path is None:
        return True  # built-in or namespace package: importable everywhere or nowhere
    return path.startswith(_installed_prefixes())


@functools.cache
def _installed_prefixes() -> tuple[str, ...]:
    """Where the standard library and installed packages live, looked up when a
    client first pickles a function: a node never does, and `sysconfig` with its
    build tables (0.1 MiB) stays out of the image its processes share."""
    import sysconfig

    return tuple(
        {
            sysconfig.get_paths()[key]
            for key in ("stdlib", "platstdlib", "purelib", "platlib")
        }
    )


def _is_plain(obj: Any) -> bool:
    """True for values stdlib pickle handles faster, with identical results, and
    that hold no ``bytes`` large enough to travel out of band.

    One walk, with loops rather than generators: it runs for every job's arguments
    and every result.
    """
    kind = type(obj)
    if kind in _SCALAR:
        return True
    if kind is bytes:
        return len(obj) < _OOB_MIN
    if kind is tuple or kind is list:
        for item in obj:
            if type(item) not in _SCALAR and not _is_plain(item):
                return False
        return True
    if kind is dict:
        for key, value in obj.items():
            if type(key) not in _PLAIN:
                return False
            if type(value) not in _SCALAR and not _is_plain(value):
                return False
        return True
    return False


def _describe(obj: Any) -> str:
    text = repr(obj)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"object of type {type(obj).__qualname__!r} ({text})"
