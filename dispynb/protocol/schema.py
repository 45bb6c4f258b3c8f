"""Message families: the msgpack header codec, and the `Message` base that turns a
header into a frozen dataclass (checking its fields' types) and back.

Headers are msgpack maps with an ``"op"`` key; msgpack cannot execute code, so headers
are safe to decode from anyone (with size limits). Payload buffers (pickles) travel
beside the header and are only ever loaded from an authenticated peer.

Each family of messages (the client-node wire protocol, `dispynb.protocol.messages`;
the node's internal channels in ``nodeserver``) subclasses `Message` once and gets
its own op registry; `message` declares one op of it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import operator
import reprlib
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Self

import msgpack

from dispynb.errors import MessageError
from dispynb.protocol.packages import require
from dispynb.protocol.records import Utf8Text

require(msgpack, "Packer")

#: Limits for headers decoded before authentication (handshake messages are tiny).
_PRE_AUTH_LIMITS = {
    "max_str_len": 4096,
    "max_bin_len": 4096,
    "max_array_len": 64,
    "max_map_len": 64,
    "max_ext_len": 0,
}


#: One msgpack packer per thread (``msgpack.packb`` makes one per call; a packer
#: resets itself after each message, also after a failed one).
_packers = threading.local()


def _packable(value: object) -> object:
    """What msgpack packs in place of ``value``, of a type it does not know: a
    `Utf8Text` (a node's result entry) goes as the str it stands for."""
    if type(value) is Utf8Text:
        return value.decode()
    raise TypeError(f"cannot pack {type(value).__name__} in a message header")


def pack_header(header: dict[str, Any]) -> bytes:
    """Encode a header map."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, default=_packable)
    packed: bytes = packer.pack(header)
    return packed


def unpack_header(data: bytes | memoryview, *, trusted: bool) -> dict[str, Any]:
    """Decode a header map; untrusted (pre-auth) data gets tight size limits."""
    try:
        if trusted:
            header = msgpack.unpackb(data, raw=False, strict_map_key=True)
        else:
            header = msgpack.unpackb(
                data, raw=False, strict_map_key=True, **_PRE_AUTH_LIMITS
            )
    except Exception as exc:
        # fix: some msgpack errors (StackError, nesting too deep) have no text
        reason = str(exc) or type(exc).__name__
        raise MessageError(f"undecodable message header: {reason}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise MessageError("message header is not a map with a string 'op'")
    return header


_SIMPLE = (int, float, str, bytes, bool, list, dict)
_CHECKS: dict[type, tuple[tuple[str, tuple[type, ...], bool], ...]] = {}
#: Per class: its field names and, for each, the types it accepts (``object`` for
#: anything): a header that has every field, each of a right type, is turned into
#: its message in a few C-level calls (`Message.from_header`).
_FAST: dict[type, tuple[tuple[str, ...], tuple[type | tuple[type, ...], ...]]] = {}
_FIELDS: dict[type, tuple[tuple[str, ...], Callable[[Any], Any] | None]] = {}
#: For `Message.from_header`: a message made field by field, as a frozen dataclass's
#: own __init__ does (object.__setattr__ past the frozen guard).
_new = object.__new__
_set = object.__setattr__
_consume = collections.deque


class Message:
    """Base of a message family; subclasses declare ``op`` and dataclass fields."""

    op: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[Message]]]

    def __init_subclass__(cls, family: bool = False, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if family:
            cls._registry = {}

    @classmethod
    def _field_checks(cls) -> tuple[tuple[str, tuple[type, ...], bool], ...]:
        # Resolved once per class: (name, accepted types, required).
        checks: tuple[tuple[str, tuple[type, ...], bool], ...] | None
        checks = _CHECKS.get(cls)
        if checks is None:
            hints = typing.get_type_hints(cls)
            out = []
            for field in dataclasses.fields(cls):  # type: ignore[arg-type]
                types = _accepted_types(hints[field.name])
                required = (
                    field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING
                )
                out.append((field.name, types, required))
            checks = tuple(out)
            _CHECKS[cls] = checks
        return checks

    def to_header(self) -> dict[str, Any]:
        """The header map for this message."""
        names, getter = _field_names(type(self))
        header: dict[str, Any]
        if getter is None:
            header = {}
        elif len(names) == 1:
            header = {names[0]: getter(self)}
        else:  # all values in one call, no Python-level loop
            header = dict(zip(names, getter(self), strict=True))
        header["op"] = self.op
        return header

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> Self:
        """Build the message registered for ``header['op']``, checking field types."""
        op = header.get("op")
        kind = cls._registry.get(op)  # type: ignore[arg-type]
        if kind is None or not issubclass(kind, cls):
            raise MessageError(f"unknown or unexpected message op {op!r}")
        fast = _FAST.get(kind)
        if fast is None:
            checks = kind._field_checks()
            fast = _FAST[kind] = (
                tuple(name for name, _types, _required in checks),
                tuple(accepted or object for _name, accepted, _required in checks),
            )
        names, accepted = fast
        try:
            values = tuple(map(header.__getitem__, names))
        except KeyError:  # a field left out: its default, or the error saying so
            return kind._checked(op, header)
        if not all(map(isinstance, values, accepted)):
            return kind._checked(op, header)  # raises, naming the field
        # Every field is there, each checked: its slots are filled in one C-level
        # pass, without __init__'s keyword matching (a few us per message, and
        # every message of a round trip is decoded here). No message class has a
        # __post_init__ (`message` refuses one).
        made = _new(kind)
        _consume(map(_set, itertools.repeat(made), names, values), 0)
        return made

    @classmethod
    def _checked(cls, op: Any, header: dict[str, Any]) -> Self:
        """`from_header`'s field by field path, for ``cls`` itself."""
        kind = cls
        values = {}
        for name, accepted, required in kind._field_checks():
            if name not in header:
                if required:
                    raise MessageError(f"{op!r} message lacks field {name!r}")
                continue
            value = header[name]
            if accepted and not isinstance(value, accepted):
                raise MessageError(
                    f"{op!r} message field {name!r} has type {type(value).__name__}"
                )
            values[name] = value
        return kind(**values)


def _accepted_types(hint: Any) -> tuple[type, ...]:
    """Runtime types a field annotation accepts (empty tuple: anything)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(hint):
            sub = _accepted_types(arg)
            if not sub:
                return ()
            out.extend(sub)
        return tuple(out)
    if hint is type(None):
        return (type(None),)
    base = origin or hint
    if base is float:
        return (float, int)
    if base is tuple:
        return (list, tuple)
    if isinstance(base, type) and issubclass(base, _SIMPLE):
        return (base,)
    return ()


_M = typing.TypeVar("_M", bound=type[Message])


class _Factory:
    """__init__'s default of a field whose default a factory makes (as dataclasses)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


def _values(message: Message) -> tuple[Any, ...]:
    """The message's field values, in field order."""
    names, getter = _field_names(type(message))
    if getter is None:
        return ()
    if len(names) == 1:
        return (getter(message),)
    values: tuple[Any, ...] = getter(message)
    return values


def _field_names(cls: type) -> tuple[tuple[str, ...], Callable[[Any], Any] | None]:
    """A message class's field names and a getter of their values (resolved once)."""
    fields = _FIELDS.get(cls)
    if fields is None:
        names = tuple(f.name for f in dataclasses.fields(cls))
        fields = _FIELDS[cls] = (names, operator.attrgetter(*names) if names else None)
    return fields


# What a frozen dataclass (eq, repr, slots) gets per class, shared by every message
# class instead: dataclasses compiles six functions a class, 0.27 ms of CPU, 13 ms
# for the 47 message classes the client and the node each make as they start.


@reprlib.recursive_repr()
def _repr(self: Message) -> str:
    names = _field_names(type(self))[0]
    values = _values(self)
    shown = ", ".join(
        f"{name}={value!r}" for name, value in zip(names, values, strict=True)
    )
    return f"{type(self).__qualname__}({shown})"


def _eq(self: Message, other: Any) -> object:
    if other.__class__ is self.__class__:
        return _values(self) == _values(other)
    return NotImplemented


def _hash(self: Message) -> int:
    return hash(_values(self))


def _setattr(self: Message, name: str, value: object) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Message, name: str) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


def _getstate(self: Message) -> list[Any]:
    return list(_values(self))


def _setstate(self: Message, state: list[Any]) -> None:
    _consume(map(_set, itertools.repeat(self), _field_names(type(self))[0], state), 0)


_SHARED = {
    "__repr__": _repr,
    "__eq__": _eq,
    "__hash__": _hash,
    "__setattr__": _setattr,
    "__delattr__": _delattr,
    "__getstate__": _getstate,
    "__setstate__": _setstate,
}


def _make_init(cls: type) -> Callable[..., None]:
    """A frozen dataclass's keyword-only __init__ for ``cls``, compiled alone."""
    params = []
    body = []
    namespace: dict[str, Any] = {"_set": _set, "_FACTORY": _FACTORY}
    for index, field in enumerate(dataclasses.fields(cls)):
        name = field.name
        if not field.init or name.startswith("_"):
            # (the generated code's own names all start with "_")
            raise TypeError(f"message field {name!r} must be an init field, no _name")
        value = name
        if field.default is not dataclasses.MISSING:
            namespace[f"_d{index}"] = field.default
            name = f"{name}=_d{index}"
        elif field.default_factory is not dataclasses.MISSING:
            namespace[f"_f{index}"] = field.default_factory
            value = f"_f{index}() if {name} is _FACTORY else {name}"
            name = f"{name}=_FACTORY"
        params.append(name)
        body.append(f"    _set(_self, {field.name!r}, {value})")
    star = "*, " if params else ""
    source = f"def __init__(_self, {star}{', '.join(params)}):\n"
    source += "\n".join(body or ["    pass"]) + "\n"
    exec(source, namespace)  # built from field names only, as dataclasses does
    init: Callable[..., None] = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__annotations__ = {f.name: f.type for f in dataclasses.fields(cls)}
    init.__annotations__["return"] = None
    return init


@typing.dataclass_transform(frozen_default=True, kw_only_default=True)
def message(op: str) -> typing.Callable[[_M], _M]:
    """Class decorator: a frozen, slotted, kw-only dataclass registered as ``op``."""

    def register(cls: _M) -> _M:
        if "__post_init__" in vars(cls):
            # `Message.from_header` fills a decoded message's fields without
            # calling __init__: checks belong in the field types, or the handler.
            raise TypeError(f"message {op!r} may not define __post_init__")
        for name in ("__init__", *_SHARED):
            if name in vars(cls):
                raise TypeError(f"message {op!r} may not define {name}")
        # dataclasses only collects the fields and makes the slotted class: the
        # methods it would compile one by one are shared, or compiled at once.
        made = dataclasses.dataclass(
            init=False, repr=False, eq=False, slots=True, kw_only=True
        )(cls)
        if op in made._registry:
            raise TypeError(f"op {op!r} is declared twice")
        setattr(made, "__init__", _make_init(made))  # noqa: B010 - a method, not typed
        for name, function in _SHARED.items():
            setattr(made, name, function)
        made.op = op
        made._registry[op] = made
        return typing.cast(_M, made)

    return register


__all__ = ["Message", "message", "pack_header", "unpack_header"]
