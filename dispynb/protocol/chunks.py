"""A large result streamed in `ResultChunk` messages: cut (`split_entry`, the node's
live results and the results it kept for a crashed client), cut again to a smaller
client's limit (`fit_message`, the shared scheduler's relay) and reassembled
(`add_chunk`, `take_output`, `take_stream`).

A streamed result's large stdout, stderr and exception text travel in chunks too
(buffer indexes `STDOUT_INDEX`, `STDERR_INDEX` and `EXCEPTION_INDEX`, UTF-8 for
text), so that no output is too large for a message: dispy truncates nothing, and
neither does a streamed result.

Reassembly is shared by the client's driver and by `dispynb.recovery`, so both take a
streamed result with the same checks and bounds. ``streams`` maps a stream id (the
caller's: which node, job and attempt) to its buffers so far, or to None once refused.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Hashable, Iterator
from typing import Any, TypeVar

from dispynb.protocol.messages import FilesMissing, JobResults, Message, ResultChunk
from dispynb.protocol.records import ResultEntry, Utf8Text, is_start

#: A stream id, as the caller names its streams.
K = TypeVar("K", bound=Hashable)
#: Buffer index -> ``[place, bytes filled, announced size, kind]`` (None: the
#: stream was refused).
Parts = dict[int, list[Any]]

#: `ResultChunk.index` of a streamed result's stdout and stderr.
STDOUT_INDEX = -1
STDERR_INDEX = -2
#: ... and of its exception (the traceback).
EXCEPTION_INDEX = -3
#: `ResultChunk.kind` of an output that is text (UTF-8); bytes have kind "".
TEXT = "s"
#: Positions of stdout, stderr and exception in a result's entry (`ResultEntry`).
_OUTPUTS = ((5, STDOUT_INDEX), (6, STDERR_INDEX), (7, EXCEPTION_INDEX))

#: `add_chunk`: the result is over the cap (the stream is refused).
TOO_LARGE = "too large"
#: `add_chunk`: the chunk is malformed (the stream is refused).
MALFORMED = "malformed"


def split_result(
    comp_id: int,
    key: int,
    attempt: int,
    buffers: list[memoryview],
    kinds: str,
    chunk_bytes: int,
) -> Iterator[tuple[ResultChunk, memoryview]]:
    """The chunks of a result's ``buffers`` (views: nothing is copied), at most
    ``chunk_bytes`` each; ``kinds``: a letter per out-of-band buffer (the first
    buffer is the pickle itself), "b" for one that becomes ``bytes``. Its entry,
    marked streamed, goes after them."""
    for index, buffer in enumerate(buffers):
        kind = kinds[index - 1] if 0 < index <= len(kinds) else ""
        view = buffer.cast("B") if buffer.format != "B" else buffer
        yield from _split_buffer(comp_id, key, attempt, index, view, kind, chunk_bytes)


def _split_buffer(
    comp_id: int,
    key: int,
    attempt: int,
    index: int,
    view: memoryview,
    kind: str,
    chunk_bytes: int,
) -> Iterator[tuple[ResultChunk, memoryview]]:
    """The chunks of one buffer (``index``) of a result, at most ``chunk_bytes``."""
    size = view.nbytes
    for offset in range(0, size, chunk_bytes):
        chunk = ResultChunk(
            comp_id=comp_id,
            key=key,
            attempt=attempt,
            index=index,
            offset=offset,
            size=size,
            kind=kind,
        )
        yield chunk, view[offset : offset + chunk_bytes]


def split_entry(
    comp_id: int,
    entry: list[Any],
    buffers: list[memoryview],
    kinds: str,
    chunk_bytes: int,
) -> tuple[list[Any], list[tuple[ResultChunk, memoryview]]]:
    """A result streamed: its entry marked streamed (see `ResultEntry.to_wire`),
    to send after its chunks: those of ``buffers`` (`split_result`) and of its
    stdout and stderr where they are longer than a sixteenth of a chunk (the entry
    then has them empty)."""
    key, attempt = entry[0], entry[1]
    entry = list(entry[:9])
    chunks = list(split_result(comp_id, key, attempt, buffers, kinds, chunk_bytes))
    for position, index in _OUTPUTS:
        text = entry[position]
        if (
            not isinstance(text, str | bytes | Utf8Text)
            or len(text) <= chunk_bytes // 16
        ):
            continue
        if isinstance(text, Utf8Text):  # sent as it came from the worker
            kind, data, entry[position] = TEXT, memoryview(text.data), ""
        elif isinstance(text, str):
            kind, entry[position] = TEXT, ""
            data = memoryview(text.encode("utf-8", "surrogatepass"))
        else:
            kind, data, entry[position] = "", memoryview(text), b""
        chunks += _split_buffer(comp_id, key, attempt, index, data, kind, chunk_bytes)
    entry.append(True)
    return entry, chunks


def chunk_bytes_for(max_message_size: int) -> int:
    """The largest chunk (or whole result) sent to a peer that takes messages of at
    most ``max_message_size`` bytes: half of it, leaving room for the header."""
    return max_message_size // 2


def entry_text_bytes(entry: list[Any]) -> int:
    """About how many bytes a result's entry takes in a message (its output and
    exception text, 4 bytes a character at most in UTF-8)."""
    return 256 + sum(
        4 * len(item) if isinstance(item, str) else len(item)
        for item in entry
        if isinstance(item, str | bytes | Utf8Text)
    )


def holds_utf8(entry: list[Any]) -> bool:
    """Whether a result's entry holds output or a traceback as `Utf8Text` (large:
    streamed as it is, not decoded to be packed in the entry)."""
    return any(type(text) is Utf8Text for text in entry[5:8])


def fit_message(
    message: Message, buffers: list[memoryview], max_message_size: int
) -> Iterator[tuple[Message, list[memoryview]]]:
    """``message`` as messages that a peer taking at most ``max_message_size``
    bytes accepts: itself if it is small enough; a `ResultChunk` cut into smaller
    ones; a `JobResults` one message per result, a large one streamed (its
    buffers in chunks, then its entry marked streamed); a `FilesMissing` as
    several, each asking for some of the files (a client sends each its files).
    Buffers are views: nothing is copied. Other messages pass as they are."""
    room = chunk_bytes_for(max_message_size)
    if isinstance(message, FilesMissing):
        yield from _fit_digests(message, room)
        return
    if isinstance(message, ResultChunk):
        view = buffers[0].cast("B") if len(buffers) == 1 else None
        if view is None or view.nbytes <= room:
            yield message, buffers
            return
        for offset in range(0, view.nbytes, room):
            part = dataclasses.replace(message, offset=message.offset + offset)
            yield part, [view[offset : offset + room]]
        return
    if not isinstance(message, JobResults):
        yield message, buffers
        return
    size = sum(b.nbytes for b in buffers)
    size += sum(entry_text_bytes(item) for item in message.results)
    if size < room:
        yield message, buffers
        return
    yield from _fit_results(message, buffers, room)


#: Bytes a digest of a `FilesMissing` takes in its header besides its characters
#: (msgpack's string head, and a margin).
_DIGEST_ROOM = 8


def _fit_digests(
    message: FilesMissing, room: int
) -> Iterator[tuple[Message, list[memoryview]]]:
    """`fit_message` of a `FilesMissing`: the digests in messages of at most
    ``room`` bytes of them. A computation listing 60,000 files was asked for all in
    one message of 3.9 MB, which a client taking 1 MB dropped, with the scheduler
    or node that sent it."""
    digests = message.digests
    if sum(_digest_bytes(d) for d in digests) <= room:
        yield message, []
        return
    part: list[str] = []
    size = 0
    for digest in digests:
        cost = _digest_bytes(digest)
        if part and size + cost > room:
            yield dataclasses.replace(message, digests=part), []
            part, size = [], 0
        part.append(digest)
        size += cost
    yield dataclasses.replace(message, digests=part), []


def _digest_bytes(digest: object) -> int:
    """Bytes a digest takes in a header at most (4 a character past ASCII)."""
    if not isinstance(digest, str):
        return _DIGEST_ROOM
    return _DIGEST_ROOM + (len(digest) if digest.isascii() else 4 * len(digest))


def _fit_results(
    message: JobResults, buffers: list[memoryview], room: int
) -> Iterator[tuple[Message, list[memoryview]]]:
    """`fit_message` of a large `JobResults`: one message per result, each start
    (``[key, attempt, time, before]``) with the result it came after. A start that
    is not one (a node's garbage: the scheduler relays what nodes send) is left
    out, not passed on for the client to fail on."""
    comp_id = message.comp_id
    count = len(message.results)
    valid = [start for start in message.started if is_start(start)]
    starts: dict[int, list[list[Any]]] = {}
    for start in valid:
        starts.setdefault(min(start[3], count), []).append(start)
    offset = 0
    for index, item in enumerate(message.results):
        entry, streamed = ResultEntry.from_wire(item)
        started = [[*s[:3], 0] for s in starts.get(index, [])]
        if index == count - 1:  # those after the last result go with it
            started += [[*s[:3], 1] for s in starts.get(count, [])]
        own: list[memoryview] = []
        if not streamed:
            own = buffers[offset : offset + entry.buffer_count]
            offset += entry.buffer_count
        size = sum(b.nbytes for b in own) + entry_text_bytes(item)
        if size >= room:  # its buffers (if not streamed yet) and output in chunks
            item, chunks = split_entry(comp_id, item, own, "", room)
            for chunk, part in chunks:
                yield chunk, [part]
            own = []
        yield JobResults(comp_id=comp_id, results=[item], started=started), own
    if not count and valid:
        yield JobResults(comp_id=comp_id, results=[], started=valid), []


def add_chunk(
    streams: dict[K, Parts | None],
    stream_id: K,
    message: ResultChunk,
    buffers: list[memoryview],
    cap: int,
    output_cap: int | None = None,
) -> str | None:
    """Append a chunk to its buffer (at most ``cap`` bytes announced in all; stdout
    and stderr at most ``output_cap`` bytes each, default ``cap``); return None, or
    `TOO_LARGE` / `MALFORMED` when this chunk made the stream refused (`take_stream`
    then gives None). Each buffer's chunks come in order (as every sender cuts
    them), and a buffer holds only what arrived: a peer that announces a size and
    never sends it costs nothing (a buffer allocated at its announced size did)."""
    parts = streams.setdefault(stream_id, {})
    if parts is None:
        return None  # refused already
    target = parts.get(message.index)
    if target is None:
        index = message.index
        if index < 0:  # stdout or stderr: bounded apart
            total = message.size
            bound = cap if output_cap is None else output_cap
        else:
            total = sum(p[2] for i, p in parts.items() if i >= 0) + message.size
            bound = cap
        if (
            not EXCEPTION_INDEX <= index < 4096
            or not message.size >= 0
            or total > bound
        ):
            streams[stream_id] = None
            return TOO_LARGE
        # Both grow as chunks arrive, copied once: a bytearray's memory is
        # reallocated in place (mremap, for large ones), and a BytesIO's
        # getvalue() hands over its memory as the bytes a "b" buffer becomes.
        place = io.BytesIO() if message.kind == "b" or index < 0 else bytearray()
        target = parts[message.index] = [place, 0, message.size, message.kind]
    data = buffers[0] if len(buffers) == 1 else memoryview(b"")
    place, filled, size = target[:3]
    if message.offset != filled or filled + data.nbytes > size or not data.nbytes:
        streams[stream_id] = None
        return MALFORMED
    if isinstance(place, io.BytesIO):
        place.write(data)
    else:
        place += data
    target[1] += data.nbytes
    return None


def take_output(
    streams: dict[K, Parts | None],
    stream_id: K,
    stdout: str | bytes,
    stderr: str | bytes,
    exception: str | None,
) -> tuple[str | bytes, str | bytes, str | None]:
    """A streamed result's stdout, stderr and exception: those that came in chunks
    (taken from its stream), else those of its entry. Call before `take_stream`."""
    parts = streams.get(stream_id)
    if not parts or min(parts) >= 0:
        return stdout, stderr, exception
    outputs: list[Any] = [stdout, stderr, exception]
    for which, (_position, index) in enumerate(_OUTPUTS):
        target = parts.pop(index, None)
        if target is None:
            continue
        place, filled, size, kind = target
        data = place.getvalue() if filled == size else b""
        # (Bytes that are no UTF-8, which only a job forging its worker's
        # messages sends, replaced: not an error in the client's loop.)
        outputs[which] = data.decode("utf-8", "replace") if kind == TEXT else data
    return outputs[0], outputs[1], outputs[2]


def take_stream(
    streams: dict[K, Parts | None], stream_id: K, count: int
) -> list[bytes | bytearray] | None:
    """The ``count`` buffers of a streamed result (forgotten here), or None if they
    are not all there (refused, or chunks missing)."""
    parts = streams.pop(stream_id, None)
    if parts is None or sorted(parts) != list(range(count)):
        return None
    if any(filled != size for _place, filled, size, _kind in parts.values()):
        return None
    return [
        place.getvalue() if isinstance(place, io.BytesIO) else place
        for place, _filled, _size, _kind in (parts[i] for i in range(count))
    ]
