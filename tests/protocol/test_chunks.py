"""Reassembly of streamed results (`dispynb.protocol.chunks`): what the driver and
`recover_jobs` accept of a node's `ResultChunk` messages, and what they refuse."""

from __future__ import annotations

from typing import Any

from dispynb.protocol.auth import MAC_SIZE
from dispynb.protocol.chunks import (
    MALFORMED,
    STDOUT_INDEX,
    TEXT,
    TOO_LARGE,
    Parts,
    _fit_results,
    add_chunk,
    fit_message,
    split_entry,
    split_result,
    take_output,
    take_stream,
)
from dispynb.protocol.framing import encode_frames
from dispynb.protocol.messages import (
    FilesMissing,
    JobResults,
    Message,
    ResultChunk,
    pack_header,
    unpack_header,
)
from dispynb.protocol.records import ResultEntry, Utf8Text


def chunk(index: int, offset: int, size: int, kind: str = "") -> ResultChunk:
    return ResultChunk(
        comp_id=1, key=7, attempt=1, index=index, offset=offset, size=size, kind=kind
    )


def test_buffers_are_assembled_in_order() -> None:
    streams: dict[Any, Parts | None] = {}
    assert (
        add_chunk(streams, "s", chunk(0, 0, 3, "b"), [memoryview(b"abc")], 100) is None
    )
    assert add_chunk(streams, "s", chunk(1, 0, 6), [memoryview(b"abcd")], 100) is None
    assert add_chunk(streams, "s", chunk(1, 4, 6), [memoryview(b"ef")], 100) is None
    assert take_stream(streams, "s", 2) == [b"abc", bytearray(b"abcdef")]
    assert streams == {}  # taken: forgotten


def test_an_announced_size_is_not_allocated_before_it_arrives() -> None:
    """A TiB announced (under a larger cap), one byte sent: the buffer holds the
    byte (allocated at the announced size, it was a MemoryError)."""
    streams: dict[Any, Parts | None] = {}
    huge = chunk(0, 0, 1 << 40)
    assert add_chunk(streams, "s", huge, [memoryview(b"x")], 1 << 41) is None
    parts = streams["s"]
    assert parts is not None and parts[0][0] == bytearray(b"x")
    assert take_stream(streams, "s", 1) is None  # the rest never came


def test_a_result_over_the_cap_is_refused_and_never_taken() -> None:
    streams: dict[Any, Parts | None] = {}
    assert (
        add_chunk(streams, "s", chunk(0, 0, 60), [memoryview(b"x" * 60)], 100) is None
    )
    assert (
        add_chunk(streams, "s", chunk(1, 0, 41), [memoryview(b"y")], 100) == TOO_LARGE
    )
    # later chunks of a refused stream are dropped silently; the entry gets nothing
    assert add_chunk(streams, "s", chunk(1, 0, 1), [memoryview(b"y")], 100) is None
    assert take_stream(streams, "s", 2) is None


def test_malformed_chunks_refuse_the_stream() -> None:
    for bad, data in [
        (chunk(0, 2, 4), b"abc"),  # past the buffer's end
        (chunk(0, -1, 4), b"a"),  # before its start
        (chunk(0, 0, 4), b""),  # empty
        (chunk(0, 1, 4, "b"), b"a"),  # bytes out of order
        (chunk(0, 1, 4), b"a"),  # a bytearray's too
    ]:
        streams: dict[Any, Parts | None] = {}
        assert add_chunk(streams, "s", bad, [memoryview(data)], 100) == MALFORMED
        assert take_stream(streams, "s", 1) is None


def test_missing_chunks_or_buffers_give_nothing() -> None:
    streams: dict[Any, Parts | None] = {}
    add_chunk(streams, "s", chunk(0, 0, 4), [memoryview(b"ab")], 100)
    assert take_stream(streams, "s", 1) is None  # half of it
    add_chunk(streams, "t", chunk(1, 0, 1), [memoryview(b"a")], 100)
    assert take_stream(streams, "t", 2) is None  # buffer 0 never came
    assert take_stream(streams, "never", 1) is None


def test_a_split_result_is_assembled_whole_of_its_kinds() -> None:
    """`split_result` cuts each buffer in views of at most the chunk size (the first
    buffer, the pickle, has no kind; "b" ones are built as bytes), which
    `add_chunk` / `take_stream` put together again."""
    data = bytes(range(256)) * 41  # 10496 bytes: not a multiple of the chunk size
    pickled = bytearray(b"pickle")
    buffers = [memoryview(pickled), memoryview(data), memoryview(bytearray(data))]
    parts = list(split_result(1, 7, 2, buffers, "ba", 1000))
    assert all(part.nbytes <= 1000 and part.obj is not None for _m, part in parts)
    assert {(m.index, m.kind) for m, _part in parts} == {(0, ""), (1, "b"), (2, "a")}
    assert len(parts) == 1 + 2 * 11
    streams: dict[Any, Parts | None] = {}
    for message, part in parts:
        assert (message.comp_id, message.key, message.attempt) == (1, 7, 2)
        assert add_chunk(streams, "s", message, [part], 1 << 20) is None
    got = take_stream(streams, "s", 3)
    assert got == [b"pickle", data, bytearray(data)]
    assert [type(b) for b in got or []] == [bytearray, bytes, bytearray]


def _entry(key: int, buffer_count: int, stdout: str = "") -> list[Any]:
    return ResultEntry(
        key, 1, "finished", 1.0, 2.0, stdout, "", None, buffer_count
    ).to_wire()


def _reassembled(
    parts: list[tuple[Message, list[memoryview]]],
) -> tuple[list[list[Any]], list[Any], list[bytes]]:
    """What a client makes of ``parts``: entries, starts, each result's buffers."""
    streams: dict[Any, Parts | None] = {}
    entries: list[list[Any]] = []
    starts: list[Any] = []
    results: list[bytes] = []
    for message, buffers in parts:
        if isinstance(message, ResultChunk):
            assert add_chunk(streams, message.key, message, buffers, 1 << 30) is None
            continue
        assert isinstance(message, JobResults)
        for start in message.started:  # in the node's order, among the results
            starts.append((start[0], len(entries) + start[3]))
        offset = 0
        for item in message.results:
            entry, streamed = ResultEntry.from_wire(item)
            entries.append(item[:9])
            if streamed:
                entries[-1][5:8] = take_output(
                    streams, entry.key, entry.stdout, entry.stderr, entry.exception
                )
                taken = take_stream(streams, entry.key, entry.buffer_count)
                assert taken is not None
                results.append(b"".join(bytes(b) for b in taken))
            else:
                own = buffers[offset : offset + entry.buffer_count]
                offset += entry.buffer_count
                results.append(b"".join(bytes(b) for b in own))
    return entries, starts, results


def test_fit_message_cuts_results_and_chunks_to_a_smaller_client_limit() -> None:
    """What a node sent one client (large chunks, several results in a message)
    is cut to a client that takes smaller messages; it reassembles the same
    results, starts in the same order, every message within its limit."""
    limit = 64 * 1024
    big, small, huge = b"b" * 100_000, b"s" * 10, bytes(range(256)) * 2000
    message = JobResults(
        comp_id=3,
        results=[_entry(1, 1), _entry(2, 1), _entry(3, 2)],
        started=[[9, 1, 1.5, 0], [8, 1, 1.6, 2], [7, 1, 1.7, 3]],
    )
    buffers = [memoryview(big), memoryview(small), memoryview(huge), memoryview(b"z")]
    parts = list(fit_message(message, buffers, limit))
    for part, part_buffers in parts:
        header = pack_header(part.to_header())
        head, _ = encode_frames([header, *part_buffers], MAC_SIZE)
        assert int.from_bytes(head[:4]) <= limit  # the size the client checks
    entries, starts, results = _reassembled(parts)
    assert [e[0] for e in entries] == [1, 2, 3]
    assert starts == [(9, 0), (8, 2), (7, 3)]
    assert results == [big, small, huge + b"z"]
    # A chunk cut for a larger client: cut again, at its offsets.
    chunk_message = ResultChunk(
        comp_id=3, key=5, attempt=1, index=0, offset=0, size=len(huge), kind="b"
    )
    cut = list(fit_message(chunk_message, [memoryview(huge)], limit))
    assert len(cut) > 1
    streamed = ResultEntry.from_wire(_entry(5, 1))[0].to_wire(streamed=True)
    entry = JobResults(comp_id=3, results=[streamed])
    entries, _starts, results = _reassembled([*cut, (entry, [])])
    assert results == [huge]
    # Small enough already: unchanged.
    assert list(fit_message(message, buffers, 1 << 30)) == [(message, buffers)]


def test_a_result_whose_output_is_over_the_limit_gets_it_in_chunks() -> None:
    """Output is never cut: a stdout (text, not ASCII) and a stderr (a program's
    bytes) three times a client's limit travel in chunks, and come out whole."""
    limit = 64 * 1024
    stdout = ("\u00e9x" * limit)[: 3 * limit]
    stderr = bytes(range(256)) * (3 * limit // 256)
    item = ResultEntry(4, 2, "finished", 1.0, 2.0, stdout, stderr, None, 1).to_wire()
    traceback = "Traceback...\nValueError: " + "\u00e9" * (3 * limit)
    failed = ResultEntry(6, 1, "exception", 1.0, 2.0, "", "", traceback, 0).to_wire()
    message = JobResults(comp_id=3, results=[item, _entry(5, 0, "small"), failed])
    parts = list(fit_message(message, [memoryview(b"r")], limit))
    assert sum(isinstance(part, ResultChunk) for part, _ in parts) > 6
    for part, part_buffers in parts:
        header = pack_header(part.to_header())
        head, _ = encode_frames([header, *part_buffers], MAC_SIZE)
        assert int.from_bytes(head[:4]) <= limit
    entries, _starts, results = _reassembled(parts)
    assert [e[5:8] for e in entries] == [
        [stdout, stderr, None],
        ["small", "", None],
        ["", "", traceback],
    ]
    assert results == [b"r", b"", b""]


def test_fit_message_leaves_out_starts_that_are_not_starts() -> None:
    """The scheduler cuts what nodes send: a start that is no ``[key, attempt,
    time, before]`` (a node's garbage; the schema checks only for a list) is left
    out, the results and the real starts go on (before: IndexError on ``[1]``)."""
    garbage: list[Any] = [[], None, [1], "x", [1, 2, 3, "4"], [1, 2, 3, 4, 5]]
    message = JobResults(
        comp_id=3,
        results=[_entry(1, 1), _entry(2, 1)],
        started=[*garbage, [9, 1, 1.5, 1]],
    )
    buffers = [memoryview(b"b" * 100_000), memoryview(b"s")]
    parts = list(fit_message(message, buffers, 64 * 1024))
    entries, starts, results = _reassembled(parts)
    assert [e[0] for e in entries] == [1, 2]
    assert starts == [(9, 1)]
    assert results == [b"b" * 100_000, b"s"]
    only_starts = JobResults(comp_id=3, results=[], started=[*garbage, [9, 1, 1.5, 0]])
    assert [part.started for part, _ in _fit_results(only_starts, [], 1024)] == [
        [[9, 1, 1.5, 0]]
    ]


def test_output_kept_as_utf8_is_sent_as_it_is_and_read_as_text() -> None:
    """A node's large output kept as its UTF-8 bytes (`Utf8Text`) is streamed as
    those bytes (views of them: no copy, no decoding on the node); one small enough
    to stay in its entry is packed there as the str it stands for."""
    stdout = "\U0001f600 \u00e9\n" * 20_000
    traceback = "Traceback...\nValueError: " + "\u00e9" * 70_000
    texts = [Utf8Text(t.encode()) for t in (stdout, "small \u00e9", traceback)]
    item = ResultEntry(4, 2, "raised", 1.0, 2.0, *texts, 0).to_wire()
    streamed, chunks = split_entry(3, item, [], "", 64 * 1024)
    assert {(m.index, m.kind) for m, _ in chunks} == {(-1, TEXT), (-3, TEXT)}
    assert all(p.obj in (texts[0].data, texts[2].data) for _, p in chunks)
    header = pack_header(JobResults(comp_id=3, results=[streamed]).to_header())
    (entry,) = unpack_header(header, trusted=True)["results"]
    assert entry[5:8] == ["", "small \u00e9", ""] and entry[9] is True
    streams: dict[Any, Parts | None] = {}
    for message, part in chunks:
        assert add_chunk(streams, "s", message, [part], 1 << 30) is None
    assert take_output(streams, "s", *entry[5:8]) == (stdout, "small \u00e9", traceback)


def test_text_chunks_that_are_no_utf8_are_replaced_not_an_error() -> None:
    """Only a job forging its worker's messages sends such bytes: the client's
    loop must not fail on them (they were decoded strictly)."""
    streams: dict[Any, Parts | None] = {}
    data = memoryview(b"ok \xff\xfe")
    assert add_chunk(streams, "s", chunk(STDOUT_INDEX, 0, 5, TEXT), [data], 99) is None
    assert take_output(streams, "s", "", "", None) == ("ok \ufffd\ufffd", "", None)


def test_fit_message_asks_for_many_files_in_messages_within_the_limit() -> None:
    """A computation listing 60,000 files asks for them in one `FilesMissing` of
    3.9 MB: cut to a client taking 64 KiB, each part within it, all digests asked
    for once, in order; a short one is unchanged."""
    limit = 64 * 1024
    digests = [f"{i:064x}" for i in range(60_000)]
    message = FilesMissing(comp_id=2, digests=digests)
    parts = list(fit_message(message, [], limit))
    assert len(parts) > 1
    for part, buffers in parts:
        assert isinstance(part, FilesMissing) and part.comp_id == 2 and not buffers
        head, _ = encode_frames([pack_header(part.to_header())], MAC_SIZE)
        assert int.from_bytes(head[:4]) <= limit
    assert [d for part, _ in parts for d in part.digests] == digests  # type: ignore[attr-defined]
    few = FilesMissing(comp_id=2, digests=digests[:10])
    assert list(fit_message(few, [], limit)) == [(few, [])]
