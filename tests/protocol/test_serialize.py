"""Tests of pickling: fast path, by-value functions and classes, out-of-band buffers."""

from __future__ import annotations

import pickle
import signal
import threading

import pytest

from dispynb.errors import SerializationError
from dispynb.protocol import serialize
from dispynb.protocol.serialize import dumps, loads

PLAIN = [
    0,
    -(2**70),
    1.5,
    complex(1, 2),
    "text",
    b"bytes",
    True,
    None,
    (1, "a", (2.0, None)),
    [1, [2, [3]]],
    {"a": [1, 2], "b": {"c": b"d"}},
    [],
    {},
]


def _no_cloudpickle(*args, **kwargs):
    raise AssertionError("the cloudpickle path was used for a plain value")


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_dumps_plain_value_uses_fast_path_and_round_trips(value, monkeypatch):
    monkeypatch.setattr(serialize, "_Pickler", _no_cloudpickle)
    out = dumps(value)
    assert out == [pickle.dumps(value, protocol=5)]
    assert loads(out) == value


def test_dumps_non_plain_container_uses_cloudpickle(monkeypatch):
    monkeypatch.setattr(serialize, "_Pickler", _no_cloudpickle)
    with pytest.raises(SerializationError, match="AssertionError"):
        dumps([1, {2, 3}])


def test_dumps_closure_round_trips_by_value():
    offset = 10

    def add(x):
        return x + offset

    out = dumps(add)
    assert b"offset" in out[0]
    back = loads(out)
    assert back(5) == 15


def test_dumps_lambda_and_local_class_round_trip_by_value():
    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def norm2(self):
            return self.x**2 + self.y**2

    out = dumps((Point, Point(3, 4), lambda p: p.norm2() + 1))
    assert b"norm2" in out[0]  # the class travels by value, code included
    cls, point, fn = loads(out)
    assert isinstance(point, cls)
    assert point.norm2() == 25
    assert fn(point) == 26


def test_dumps_large_bytearray_goes_out_of_band_without_copy():
    data = bytearray(b"0123456789abcdef" * 65536)  # 1 MiB
    out = dumps(data)
    assert len(out) > 1
    assert len(out[0]) < 1024  # the pickle itself holds no copy of the data
    assert isinstance(out[1], memoryview)
    assert out[1].obj is data
    assert out[1].nbytes == len(data)
    back = loads(out)
    assert type(back) is bytearray
    assert back == data


def test_dumps_bytearray_nested_and_shared_keeps_identity():
    data = bytearray(200_000)
    other = bytearray(b"x" * 100_000)
    out = dumps({"a": data, "b": [data, other], "f": lambda: 1})
    assert len(out) == 3  # each distinct large bytearray once
    back = loads(out)
    assert back["a"] is back["b"][0]
    assert back["a"] == data
    assert back["b"][1] == other


def test_dumps_out_of_band_survives_received_memoryviews():
    data = bytearray(range(256)) * 1024
    out = dumps([data])
    # What a receiver has: read-only views of one received body.
    body = b"".join(bytes(b) for b in out)
    views, offset = [], 0
    for part in out:
        size = memoryview(part).nbytes
        views.append(memoryview(body)[offset : offset + size])
        offset += size
    assert loads(views) == [data]


def test_dumps_small_bytearray_stays_in_band():
    out = dumps([bytearray(b"small"), lambda: 0])
    assert len(out) == 1
    assert loads(out)[0] == bytearray(b"small")


def test_dumps_many_small_bytearrays_stay_under_frame_limit():
    from dispynb.protocol.framing import MAX_BUFFERS

    out = dumps([bytearray(10) for _ in range(MAX_BUFFERS + 10)])
    assert len(out) <= MAX_BUFFERS


def test_dumps_lock_raises_naming_type():
    with pytest.raises(SerializationError, match="lock") as info:
        dumps({"lock": threading.Lock()})
    assert "dict" in str(info.value)


def test_dumps_bare_lock_raises_naming_type():
    with pytest.raises(SerializationError, match="'lock'"):
        dumps(threading.Lock())


class _Alarm(Exception):
    """What a user's SIGALRM handler raises (a timeout by ``signal.alarm``)."""


class _RingsWhilePickled:
    """An object whose pickling is interrupted by a signal (raised here, at once)."""

    def __reduce__(self):
        signal.raise_signal(signal.SIGALRM)
        return (_RingsWhilePickled, ())


def test_dumps_lets_a_signal_handlers_exception_through():
    """A raising signal handler that runs while arguments are pickled (a timeout by
    alarm in the user's loop of submits) raises its own exception, which the user
    catches, and not "cannot pickle ...: Alarm" (seen under a storm of alarms)."""

    def on_alarm(signum, frame):
        raise _Alarm("timed out")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with pytest.raises(_Alarm, match="timed out"):
            dumps([1, _RingsWhilePickled()])
        with pytest.raises(_Alarm):
            dumps(_RingsWhilePickled())
    finally:
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(SerializationError, match="cannot pickle"):
        dumps(threading.Lock())  # not a handler's: still a pickling error


def test_unpicklable_argument_names_the_first_one_that_does_not_pickle():
    lock = threading.Lock()
    name, error = serialize.unpicklable_argument((1, lock), {"y": lock})
    assert name == "argument 2" and "lock" in str(error)
    name, _ = serialize.unpicklable_argument((1,), {"x": 2, "y": lock})
    assert name == "keyword argument 'y'"
    assert serialize.unpicklable_argument((1, [2]), {"x": "3"}) is None


def test_dumps_error_repr_is_truncated():
    with pytest.raises(SerializationError) as info:
        dumps([threading.Lock(), "x" * 1000])
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    "buffers",
    [[b"garbage"], [b""], [b"\x80\x05"], [bytes(range(256))], [b"GET / HTTP/1.1"]],
)
def test_loads_garbage_raises(buffers):
    with pytest.raises(SerializationError, match="cannot unpickle"):
        loads(buffers)


def test_loads_no_buffers_raises():
    with pytest.raises(SerializationError, match="no pickle data"):
        loads([])


def test_loads_missing_out_of_band_buffer_raises():
    out = dumps(bytearray(100_000))
    with pytest.raises(SerializationError):
        loads(out[:1])


def test_loads_unknown_module_raises():
    with pytest.raises(SerializationError, match="cannot unpickle"):
        loads(
            [b"\x80\x05\x95\x0f\x00\x00\x00\x00\x00\x00\x00\x8c\x03nox\x8c\x01y\x93."]
        )


# --- restricted unpickling (result_types) ---------------------------------------


class _Evil:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_restricted_loads_takes_plain_values_and_safe_types():
    import collections
    import datetime
    import decimal

    from dispynb.protocol.serialize import AllowList

    value = [
        1,
        "s",
        {"a": (1.5, None)},
        {3},
        collections.OrderedDict(x=1),
        datetime.datetime(2020, 1, 2),
        decimal.Decimal("1.5"),
        bytes(100_000),
        bytearray(100_000),
    ]
    assert serialize.loads(serialize.dumps(value), AllowList([])) == value


def test_restricted_loads_refuses_unlisted_globals():
    from dispynb.protocol.serialize import AllowList

    with pytest.raises(SerializationError, match=r"builtins\.eval.*result_types"):
        serialize.loads(serialize.dumps(_Evil()), AllowList(["fractions.*"]))


def test_restricted_loads_takes_listed_classes_and_modules():
    import ipaddress

    from dispynb.protocol.serialize import AllowList

    value = ipaddress.IPv4Address("10.0.0.1")
    data = serialize.dumps(value)
    assert serialize.loads(data, AllowList(["ipaddress.IPv4Address"])) == value
    assert serialize.loads(data, AllowList(["ipaddress.*"])) == value
    with pytest.raises(SerializationError):
        serialize.loads(data, AllowList(["decimal.*"]))
