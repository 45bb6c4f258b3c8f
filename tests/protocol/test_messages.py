"""Tests of the message schema and the msgpack header codec."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import msgpack
import pytest

from dispynb.errors import MessageError
from dispynb.protocol import messages as m
from dispynb.protocol.messages import (
    PROTOCOL_VERSION,
    Message,
    WireMessage,
    message,
    pack_header,
    unpack_header,
)

NONCE = b"\x01" * 32

SAMPLES: list[WireMessage] = [
    m.Hello(version=PROTOCOL_VERSION, role="client", nonce=NONCE, name="laptop"),
    m.Challenge(version=PROTOCOL_VERSION, role="node", nonce=NONCE),
    m.Auth(proof=b"q" * 32),
    m.Welcome(
        name="node-1",
        cpus=8,
        platform="Linux-6.1-x86_64",
        address="127.0.0.1:9711",
        max_message_size=2**30,
        pid=4242,
    ),
    m.Error(code="auth", message="wrong secret"),
    m.ComputationSetup(comp_id=1, name="compute", workers=4, dest_path="/tmp/x"),
    m.ComputationSetup(comp_id=1, name="compute", workers=4, allocates=True),
    m.ComputationReady(comp_id=1, workers=4),
    m.ComputationReady(comp_id=1, workers=4, pins=True, manages=["deallocate"]),
    m.NodeManage(comp_id=1, request=5, node="10.0.0.2:9711", action="deallocate"),
    m.NodeManaged(comp_id=1, request=5, error="node 10.0.0.2:9711 left"),
    m.NodeManage(comp_id=1, request=6, node="10.0.0.2:9711", action="cpus", cpus=-1),
    m.NodeManage(
        comp_id=1, request=7, node="10.0.0.2:9711", action="close", terminate=True
    ),
    m.NodeManaged(comp_id=1, request=6, cpus=3),
    m.ComputationFailed(comp_id=1, message="boom", traceback="Traceback ..."),
    m.ComputationClose(comp_id=1, terminate=True),
    m.ComputationClosed(comp_id=1),
    m.JobSubmit(comp_id=1, jobs=[[1, 0, 1], [2, 0, 2]]),
    m.JobCancel(comp_id=1, key=2, attempt=1),
    m.JobProvisional(comp_id=1, key=2, attempt=1),
    m.NodeStatus(avail=[50.0, 1e9, 1e10, 100.0]),
    m.NodeHealth(
        name="n1",
        version="1.0",
        pid=42,
        uptime=3.5,
        cpus=4,
        busy=2,
        clients=1,
        computations=3,
        serving=True,
        draining=False,
    ),
    m.NodeStatus(avail=[None, None, 1e10, None]),  # figures it cannot read now
    m.SchedulerNodes(
        comp_id=3,
        nodes=[["10.0.0.2:9711", "n2", "10.0.0.2", 9711, 4, 7, 1.5, [9, 12], 1, []]],
    ),
    m.SchedulerNodes(
        comp_id=3,
        nodes=[["10.0.0.2:9711", "n2", "10.0.0.2", 9711, 4, 7, 1.5, [9, 12], 1, []]],
        platforms={"10.0.0.2:9711": "Linux-6.1-x86_64-with-glibc2.36"},
    ),
    m.JobsPlaced(comp_id=3, node="10.0.0.2:9711", keys=[9, 12]),
    m.Ping(),
    m.ResultsJournaled(comp_id=1, jobs=[[3, 1], [4, 2]]),
    m.Recover(comp_id=1, recovery_id="ab" * 16),
    m.Recovered(comp_id=1, found=True, running=False),
    m.FilesMissing(comp_id=1, digests=["ab" * 32]),
    m.FilePut(digest="ab" * 32, size=3),
    m.FileRelease(digests=["ab" * 32]),
    m.FilePlace(comp_id=1, request=4, path="a/b.txt", digest="ab" * 32),
    m.FilePlaced(comp_id=1, request=4, error=""),
    m.FileFromNode(comp_id=1, key=2, path="out/r.txt"),
    m.FileSaved(comp_id=1, key=2, request=3, error="disk full"),
    m.ResultChunk(comp_id=1, key=2, attempt=1, index=1, offset=0, size=100),
    m.JobResults(
        comp_id=1,
        results=[[1, 0, m.FINISHED, 1.5, 2.5, "out", "", None, 1]],
        started=[[2, 1, 2.5, 1]],
    ),
]

HANDSHAKE = [m.Hello, m.Challenge, m.Auth, m.Error]


def test_samples_cover_every_wire_message():
    assert {s.op for s in SAMPLES} == set(WireMessage._registry)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.op)
def test_wire_message_round_trip_equal(sample):
    data = pack_header(sample.to_header())
    back = WireMessage.from_header(unpack_header(data, trusted=True))
    assert back == sample
    assert type(back) is type(sample)


@pytest.mark.parametrize(
    "sample", [s for s in SAMPLES if type(s) in HANDSHAKE], ids=lambda s: s.op
)
def test_handshake_message_untrusted_round_trip_equal(sample):
    data = pack_header(sample.to_header())
    assert WireMessage.from_header(unpack_header(data, trusted=False)) == sample


def test_optional_fields_absent_take_defaults():
    header = {"op": "computation-setup", "comp_id": 1, "name": "f", "workers": 2}
    setup = WireMessage.from_header(header)
    assert setup == m.ComputationSetup(comp_id=1, name="f", workers=2)
    assert setup.dest_path is None
    assert setup.cleanup is True


def test_optional_none_field_accepts_none():
    header = {**m.ComputationSetup(comp_id=1, name="f", workers=2).to_header()}
    assert header["dest_path"] is None
    assert WireMessage.from_header(header).dest_path is None


def test_message_is_frozen():
    hello = SAMPLES[0]
    with pytest.raises(AttributeError):
        hello.name = "other"  # type: ignore[misc]


def test_unknown_op_raises():
    with pytest.raises(MessageError, match="unknown or unexpected message op 'nope'"):
        WireMessage.from_header({"op": "nope"})


def test_missing_op_raises():
    with pytest.raises(MessageError):
        unpack_header(pack_header({"version": 1}), trusted=True)


@pytest.mark.parametrize("op", [1, None, b"hello", ["hello"]])
def test_non_string_op_raises(op):
    with pytest.raises(MessageError, match="string 'op'"):
        unpack_header(pack_header({"op": op}), trusted=True)


def test_missing_required_field_raises():
    header = SAMPLES[0].to_header()
    del header["nonce"]
    with pytest.raises(MessageError, match="'hello' message lacks field 'nonce'"):
        WireMessage.from_header(header)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", "1"),
        ("version", 1.0),
        ("nonce", "a string"),
        ("role", b"client"),
        ("name", None),
        ("name", ["list"]),
    ],
)
def test_wrong_field_type_raises(field, value):
    header = {**SAMPLES[0].to_header(), field: value}
    with pytest.raises(MessageError, match=f"field '{field}' has type"):
        WireMessage.from_header(header)


def test_float_field_accepts_int():
    # JobResults times are floats; an int is a valid msgpack number for them.
    header = {"op": "job-results", "comp_id": 1, "results": []}
    assert WireMessage.from_header(header) == m.JobResults(comp_id=1, results=[])


def test_list_field_rejects_map():
    header = {"op": "job-submit", "comp_id": 1, "jobs": {"a": 1}}
    with pytest.raises(MessageError, match="'jobs' has type dict"):
        WireMessage.from_header(header)


def test_extra_fields_are_ignored():
    header = {**SAMPLES[2].to_header(), "extra": 1}
    assert WireMessage.from_header(header) == SAMPLES[2]


def test_pre_auth_long_string_raises():
    hello = m.Hello(version=1, role="client", nonce=NONCE, name="x" * 10_000)
    data = pack_header(hello.to_header())
    with pytest.raises(MessageError, match="undecodable"):
        unpack_header(data, trusted=False)
    assert unpack_header(data, trusted=True)["name"] == "x" * 10_000


@pytest.mark.parametrize(
    "value",
    [
        b"b" * 5000,
        list(range(100)),
        {str(i): i for i in range(100)},
        msgpack.ExtType(1, b"x"),
    ],
    ids=["bin", "array", "map", "ext"],
)
def test_pre_auth_limits_reject_large_values(value):
    data = pack_header({"op": "hello", "name": value})
    with pytest.raises(MessageError, match="undecodable"):
        unpack_header(data, trusted=False)


def test_pre_auth_huge_announced_map_raises_without_allocation():
    data = b"\xdf\xff\xff\xff\xff"  # map32 announcing 2**32-1 entries, then nothing
    with pytest.raises(MessageError, match="undecodable"):
        unpack_header(data, trusted=False)


@pytest.mark.parametrize("trusted", [False, True])
def test_deeply_nested_arrays_raise(trusted):
    data = b"\x91" * 50_000 + b"\xc0"  # [[[[...None...]]]], 50000 deep
    with pytest.raises(MessageError, match="undecodable message header: StackError"):
        unpack_header(data, trusted=trusted)


@pytest.mark.parametrize("value", [[1, 2], "hello", 42, None, b"op"])
def test_non_map_header_raises(value):
    with pytest.raises(MessageError, match="not a map"):
        unpack_header(pack_header(value), trusted=False)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x81", b"\x81\xa2op", bytes(range(256)), b"GET / HTTP/1.1\r\n"],
    ids=["empty", "reserved", "truncated-map", "truncated-value", "bytes", "http"],
)
def test_garbage_bytes_raise(data):
    with pytest.raises(MessageError):
        unpack_header(data, trusted=False)


def test_pickle_bytes_raise_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(marker)))
    with pytest.raises(MessageError):
        unpack_header(payload, trusted=False)
    assert not marker.exists()


def test_non_string_map_key_raises():
    data = msgpack.packb({1: "x", "op": "hello"})
    with pytest.raises(MessageError, match="undecodable"):
        unpack_header(data, trusted=False)


def test_error_message_carries_version_by_default():
    assert m.Error(code="x", message="y").to_header()["version"] == PROTOCOL_VERSION


class _Family(Message, family=True):
    """A separate family: its ops are unknown to WireMessage and vice versa."""


@message("probe")
class _Ping(_Family):
    seq: int


def test_other_family_op_is_unknown_to_wire_messages():
    with pytest.raises(MessageError, match="unknown"):
        WireMessage.from_header({"op": "probe", "seq": 1})
    with pytest.raises(MessageError, match="unknown"):
        _Family.from_header(SAMPLES[2].to_header())
    assert _Family.from_header({"op": "probe", "seq": 3}) == _Ping(seq=3)


def test_duplicate_op_raises_type_error():
    with pytest.raises(TypeError, match="declared twice"):

        @message("probe")
        class _Again(_Family):
            seq: int


class _CreatesFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# --- what a message class is: a frozen, slotted, kw-only dataclass -------------


def test_message_classes_share_their_methods_instead_of_compiling_each():
    # dataclasses compiled six functions per class: 13 ms of CPU at every start
    # of a client and of a node (W5). Only __init__ is compiled, once a class.
    for name in ("__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__"):
        assert getattr(m.Hello, name) is getattr(m.JobResults, name), name
    assert m.Hello.__init__ is not m.Auth.__init__


def test_message_behaves_as_a_frozen_kw_only_dataclass():
    hello = m.Hello(version=1, role="client", nonce=b"n")
    assert repr(hello) == "Hello(version=1, role='client', nonce=b'n', name='')"
    assert repr(m.Ping()) == "Ping()"
    assert hello == m.Hello(version=1, role="client", nonce=b"n", name="")
    assert hello != m.Hello(version=1, role="client", nonce=b"m")
    assert hello != m.Challenge(version=1, role="client", nonce=b"n")
    assert hash(hello) == hash(m.Hello(version=1, role="client", nonce=b"n"))
    assert len({m.Auth(proof=b"a"), m.Auth(proof=b"a"), m.Auth(proof=b"b")}) == 2
    assert m.Auth(proof=b"a") == m.Auth(proof=b"a")
    with pytest.raises(dataclasses.FrozenInstanceError, match="'role'"):
        hello.role = "node"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del hello.role  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):  # TypeError in 3.11's own
        hello.other = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="missing 2 required keyword-only"):
        m.Hello(version=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="positional"):
        m.Auth(b"a")  # type: ignore[misc]
    with pytest.raises(TypeError, match="unexpected keyword"):
        m.Auth(proof=b"a", other=1)  # type: ignore[call-arg]
    ready = m.ComputationReady(comp_id=1, workers=2)
    assert (
        ready.manages == []
        and ready.manages is not m.ComputationReady(comp_id=1, workers=2).manages
    )
    assert dataclasses.replace(hello, role="node").role == "node"
    assert [f.name for f in dataclasses.fields(m.Auth)] == ["proof"]
    assert pickle.loads(pickle.dumps(ready)) == ready
    assert str(inspect.signature(m.ComputationReady)).startswith("(*, comp_id: 'int'")
    assert m.Hello.__slots__ == ("version", "role", "nonce", "name")
