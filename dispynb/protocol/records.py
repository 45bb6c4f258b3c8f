"""Named records that travel inside wire messages as positional lists or dicts.

The wire format is unchanged: a `ResultEntry` is packed by msgpack as the array it
always was, a `ComputationBundle` is the dict pickled into `ComputationSetup`'s
buffers. Code on both sides builds and reads them by name.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple, TypedDict

from dispynb.errors import MessageError

_new_tuple = tuple.__new__


def avail_figures(avail: Any) -> list[float | None]:
    """A node's ``[cpu %, memory bytes, disk bytes, swap %]`` report (`Welcome.avail`,
    `NodeStatus.avail`), each figure a finite number or None (unknown).

    The message's schema checks only that it is a list; a figure of any other kind
    (a string, a list, NaN, a bool) from a node holding the secret would reach
    arithmetic in the client's callbacks and the shared scheduler's sum over its
    nodes. Raises `MessageError` for such a report; ``[]`` (not reported) stays.
    """
    if not isinstance(avail, list | tuple) or len(avail) not in (0, 4):
        raise MessageError(f"malformed resource report from a node: {avail!r:.80}")
    figures: list[float | None] = []
    for value in avail:
        if value is None:
            figures.append(None)
        elif type(value) in (int, float) and math.isfinite(value):
            figures.append(float(value))
        else:
            raise MessageError(f"malformed resource report from a node: {avail!r:.80}")
    return figures


class Utf8Text:
    """Text held as its UTF-8 bytes: a job's large output or traceback on a node,
    which forwards and keeps it without decoding (a str of it took up to 4 bytes a
    character, and was encoded again to be sent: a node grew 6 times the size of a
    job's emoji output). In a `ResultEntry` it stands for a str: streamed, its
    bytes are a `ResultChunk` of kind text as they are (`chunks.split_entry`);
    packed in a message header, it is decoded (`messages.pack_header`)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview) -> None:
        #: Bytes, or a view of the message a node read them in (not copied out).
        self.data = data

    def __len__(self) -> int:
        """Its bytes (not characters)."""
        return len(self.data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Utf8Text) and other.data == self.data

    __hash__ = None  # type: ignore[assignment]

    def __sizeof__(self) -> int:
        data = self.data
        size = object.__sizeof__(self) + sys.getsizeof(data)
        if type(data) is memoryview:
            size += data.nbytes  # of the message it views, kept alive by it
        return size

    def __repr__(self) -> str:
        return f"Utf8Text({bytes(self.data[:40])!r}, {len(self.data)} bytes)"

    def decode(self) -> str:
        """The text (bytes that are no UTF-8, which only a job forging its
        worker's messages sends, replaced)."""
        return str(self.data, "utf-8", "replace")


class ResultEntry(NamedTuple):
    """One job's end in `JobResults.results` (packed as a 9-item array).

    A tenth item ``True`` on the wire (`to_wire` with ``streamed``) says that the
    result's ``buffer_count`` buffers came before in `ResultChunk` messages.
    """

    key: int
    attempt: int
    #: One of `dispynb.protocol.messages.OUTCOMES`.
    outcome: str
    #: Epoch seconds (the node's clock); 0.0 for a job that never started.
    start_time: float
    end_time: float
    #: What it printed (bytes for a program computation). On a node, these three
    #: may also be `Utf8Text` (large), which the wire carries as str.
    stdout: str | bytes
    stderr: str | bytes
    #: The traceback or the reason; None when it finished.
    exception: str | None
    #: Buffers of its pickled result (0 unless it finished).
    buffer_count: int

    @classmethod
    def unrun(cls, key: int, attempt: int, outcome: str, reason: str) -> ResultEntry:
        """A job that ended without a result (cancelled, crashed, handed back...)."""
        return cls(key, attempt, outcome, 0.0, 0.0, "", "", reason, 0)

    def to_wire(self, streamed: bool = False) -> list[Any]:
        """The array sent in `JobResults.results`."""
        return [*self, True] if streamed else list(self)

    @classmethod
    def from_wire(cls, item: Any) -> tuple[ResultEntry, bool]:
        """``(entry, streamed)`` from an array of `JobResults.results`.

        Raises `MessageError` for an array of another shape.
        """
        if not isinstance(item, list | tuple) or len(item) not in (9, 10):
            raise MessageError("malformed result entry in job-results")
        entry = _new_tuple(cls, item[:9])  # `_make` less its length check (done)
        if not (
            isinstance(entry.key, int)
            and isinstance(entry.attempt, int)
            and isinstance(entry.buffer_count, int)
            and entry.buffer_count >= 0
        ):
            raise MessageError("malformed result entry in job-results")
        start, end = entry.start_time, entry.end_time
        if not (_is_time(start) and _is_time(end)):
            start, end = _times(start, end)
            entry = entry._replace(start_time=start, end_time=end)
        return entry, len(item) == 10 and item[9] is True


def _is_time(value: object) -> bool:
    """Whether ``value`` is a time a node may report: a finite number."""
    return (type(value) is float and math.isfinite(value)) or type(value) is int


def _times(start: Any, end: Any) -> tuple[float, float]:
    """A job's start and end times from a node that sent one that is no time (NaN,
    infinite, not a number): the other for both, or 0.0 (never started). A NaN
    reached the web monitor's JSON, which a browser cannot parse."""
    good = [float(t) for t in (start, end) if _is_time(t)]
    other = good[0] if good else 0.0
    return (
        float(start) if _is_time(start) else other,
        float(end) if _is_time(end) else other,
    )


def is_start(item: object) -> bool:
    """Whether ``item`` is a job's start as `JobResults.started` holds them,
    ``[key, attempt, start_time, before]``: the message's schema checks only that
    each is a list, and a node may send anything in it."""
    return (
        isinstance(item, list)
        and len(item) == 4
        and isinstance(item[0], int)
        and isinstance(item[1], int)
        and _is_time(item[2])
        and isinstance(item[3], int)
    )


class SharedNodeEntry(NamedTuple):
    """One node in `SchedulerNodes.nodes` (packed as a 10-item array): a node behind
    a shared scheduler, with one computation's counts on it."""

    #: ``host:port`` as the scheduler reaches it (stable while the node is known).
    node_id: str
    #: Host name the node reports ("" if unknown).
    name: str
    host: str
    port: int
    #: CPUs of the node the computation may use (its jobs in parallel at most).
    cpus: int
    #: The computation's jobs that ended on the node, and their run time in seconds.
    jobs_done: int
    cpu_time: float
    #: Keys of the computation's jobs sent to the node and not ended.
    running: list[int]
    #: How many of them have started executing.
    busy: int
    #: ``[cpu %, memory bytes, disk bytes, swap %]`` available ([] if unknown; None
    #: for a figure the node cannot read now).
    avail: list[float | None]

    def to_wire(self) -> list[Any]:
        """The array sent in `SchedulerNodes.nodes`."""
        return list(self)

    @classmethod
    def from_wire(cls, item: Any) -> SharedNodeEntry:
        """An entry from an array of `SchedulerNodes.nodes`.

        Raises `MessageError` for an array of another shape or with wrong types.
        """
        if not isinstance(item, list | tuple) or len(item) != 10:
            raise MessageError("malformed node entry in scheduler-nodes")
        entry = cls._make(item)
        numbers = (int, float)
        if not (
            isinstance(entry.node_id, str)
            and isinstance(entry.name, str)
            and isinstance(entry.host, str)
            and all(
                type(v) is int and v >= 0
                for v in (entry.port, entry.cpus, entry.jobs_done, entry.busy)
            )
            and isinstance(entry.cpu_time, numbers)
            and isinstance(entry.running, list | tuple)
            and all(type(key) is int for key in entry.running)
        ):
            raise MessageError("malformed node entry in scheduler-nodes")
        return entry._replace(
            cpu_time=float(entry.cpu_time),
            running=list(entry.running),
            avail=avail_figures(entry.avail),
        )


class ProgramFile(TypedDict):
    """A program computation (``JobCluster('prog.py')``): its file."""

    name: str
    data: bytes


class ComputationBundle(TypedDict):
    """What `ComputationSetup`'s buffers hold, pickled: the computation to set up."""

    #: The function jobs call (None for a program).
    func: Callable[..., Any] | None
    program: ProgramFile | None
    setup: Callable[..., Any] | None
    cleanup: Callable[..., Any] | None
    #: ``setup(*setup_args)`` and ``cleanup(*setup_args)`` (`NodeAllocate`).
    setup_args: tuple[Any, ...]
    #: Objects put in the computation's globals by name (``depends``).
    names: dict[str, Any]


__all__ = ["ComputationBundle", "ProgramFile", "ResultEntry", "SharedNodeEntry"]
