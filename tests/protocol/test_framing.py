"""Tests of length-prefixed framing: encoding, prefix checks, incremental decoding."""

from __future__ import annotations

import os
import struct
import tracemalloc

import psutil
import pytest

from dispynb.errors import FramingError
from dispynb.protocol import framing
from dispynb.protocol.framing import (
    MAX_BUFFERS,
    PREFIX,
    PREFIX_SIZE,
    SPARES,
    FrameDecoder,
    buffers_size,
    encode_frames,
    parse_prefix,
    split_body,
)

CAP = 64 * 1024
MAC = 32
BUFFERS = [b"header", b"", b"abc", bytes(range(256)) * 4]


def frame(buffers, mac: bytes = b"") -> bytes:
    head, parts = encode_frames(buffers, len(mac))
    return b"".join([head, *parts, mac])


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 13, 64, 1000, 10**6])
def test_decoder_any_chunking_round_trips(size):
    data = frame(BUFFERS) + frame([b"second", bytearray(b"x" * 300)])
    decoder = FrameDecoder(CAP)
    out = []
    for chunk in chunks(data, size):
        out.extend(decoder.feed(chunk))
    assert [[bytes(b) for b in m[1]] for m in out] == [
        BUFFERS,
        [b"second", b"x" * 300],
    ]
    assert decoder.pending == 0


def test_decoder_byte_by_byte_yields_message_only_at_last_byte():
    data = frame(BUFFERS)
    decoder = FrameDecoder(CAP)
    for byte in data[:-1]:
        assert decoder.feed(bytes([byte])) == []
    assert decoder.pending == len(data) - 1
    [(prefix, buffers, signed, mac)] = decoder.feed(data[-1:])
    assert prefix == data[:PREFIX_SIZE]
    assert [bytes(b) for b in buffers] == BUFFERS
    assert bytes(signed) == data[PREFIX_SIZE:]
    assert bytes(mac) == b""


def test_decoder_with_mac_separates_signed_part_and_mac():
    mac = bytes(range(MAC))
    data = frame(BUFFERS, mac)
    decoder = FrameDecoder(CAP, mac_size=MAC)
    out = []
    for byte in data:
        out.extend(decoder.feed(bytes([byte])))
    [(prefix, buffers, signed, got_mac)] = out
    assert [bytes(b) for b in buffers] == BUFFERS
    assert bytes(got_mac) == mac
    assert prefix + bytes(signed) + bytes(got_mac) == data


def test_encode_frames_body_length_counts_table_buffers_and_mac():
    head, parts = encode_frames(BUFFERS, MAC)
    body, count = PREFIX.unpack(head[:PREFIX_SIZE])
    assert count == len(BUFFERS)
    assert body == 4 * len(BUFFERS) + sum(len(b) for b in BUFFERS) + MAC
    assert len(head) == PREFIX_SIZE + 4 * len(BUFFERS)
    assert parts == BUFFERS


def test_encode_frames_memoryview_of_wide_items_counts_bytes():
    view = memoryview(struct.pack("!4d", 1, 2, 3, 4)).cast("d")
    head, _ = encode_frames([b"h", view])
    body, _ = PREFIX.unpack(head[:PREFIX_SIZE])
    assert body == 8 + 1 + 32


def test_parse_prefix_announcing_4_gib_raises_before_any_body():
    decoder = FrameDecoder(CAP)
    tracemalloc.start()
    try:
        with pytest.raises(FramingError, match="cap"):
            decoder.feed(PREFIX.pack(2**32 - 1, 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_parse_prefix_over_cap_by_one_raises():
    with pytest.raises(FramingError, match="cap"):
        parse_prefix(PREFIX.pack(CAP + 1, 1), CAP)
    assert parse_prefix(PREFIX.pack(CAP, 1), CAP) == (CAP, 1)


def test_parse_prefix_zero_buffers_raises():
    with pytest.raises(FramingError, match="buffer count 0"):
        parse_prefix(PREFIX.pack(0, 0), CAP)


def test_parse_prefix_too_many_buffers_raises():
    count = MAX_BUFFERS + 1
    with pytest.raises(FramingError, match="buffer count"):
        parse_prefix(PREFIX.pack(4 * count, count), 2**32 - 1)


def test_encode_frames_zero_buffers_raises():
    with pytest.raises(FramingError, match="1 to"):
        encode_frames([])


def test_encode_frames_too_many_buffers_raises():
    with pytest.raises(FramingError, match="1 to"):
        encode_frames([b""] * (MAX_BUFFERS + 1))


def test_encode_frames_over_4_gib_raises():
    big = bytes(1 << 20)  # the same 1 MiB buffer, 4097 times: no 4 GiB allocation
    with pytest.raises(FramingError, match="4 GiB"):
        encode_frames([big] * 4097)


@pytest.mark.parametrize("size", [0, 1, 7, 9])
def test_parse_prefix_wrong_length_raises(size):
    with pytest.raises(FramingError, match="truncated"):
        parse_prefix(bytes(size), CAP)


def test_decoder_truncated_prefix_waits_without_output():
    decoder = FrameDecoder(CAP)
    assert decoder.feed(b"\x00\x00\x00") == []
    assert decoder.pending == 3


def test_parse_prefix_body_too_short_for_table_raises():
    with pytest.raises(FramingError, match="too short"):
        parse_prefix(PREFIX.pack(7, 2), CAP)


def test_parse_prefix_body_too_short_for_mac_raises():
    with pytest.raises(FramingError, match="too short"):
        parse_prefix(PREFIX.pack(4 + MAC - 1, 1), CAP, mac_size=MAC)
    assert parse_prefix(PREFIX.pack(4 + MAC, 1), CAP, mac_size=MAC) == (4 + MAC, 1)


@pytest.mark.parametrize("announced", [5, 10**6])
def test_split_body_lengths_not_adding_up_raises(announced):
    body = struct.pack("!I", announced) + b"hello-world"
    with pytest.raises(FramingError, match="add up"):
        split_body(body, 1)


def test_decoder_lengths_not_adding_up_raises():
    body = struct.pack("!2I", 3, 3) + b"abcdefg"  # 7 bytes where the table says 6
    data = PREFIX.pack(len(body), 2) + body
    with pytest.raises(FramingError, match="add up"):
        FrameDecoder(CAP).feed(data)


def test_decoder_frame_without_mac_on_signed_decoder_raises():
    data = frame([b"x" * 40])  # long enough to pass the prefix check with a MAC
    with pytest.raises(FramingError, match="add up"):
        FrameDecoder(CAP, mac_size=MAC).feed(data)


def test_decoder_frame_with_mac_on_unsigned_decoder_raises():
    data = frame([b"header"], mac=bytes(MAC))
    with pytest.raises(FramingError, match="add up"):
        FrameDecoder(CAP).feed(data)


def test_split_body_returns_views_without_copy():
    body = bytearray(frame(BUFFERS)[PREFIX_SIZE:])
    buffers, signed, mac = split_body(body, len(BUFFERS))
    assert all(b.obj is body for b in buffers)
    assert signed.obj is body
    assert len(mac) == 0


# --- zero-copy reading: buffer() / filled() / partial() ---------------------------


def _fill(decoder: FrameDecoder, data: bytes, step: int) -> list:
    """Write ``data`` into the decoder's own buffers, ``step`` bytes at a time."""
    frames = []
    view = memoryview(data)
    while view:
        space = decoder.buffer()
        assert len(space) > 0
        count = min(step, len(space), len(view))
        space[:count] = view[:count]
        view = view[count:]
        frames.extend(decoder.filled(count))
    return frames


def test_filled_small_frames_come_out_whole_and_writable():
    data = frame(BUFFERS) + frame([b"second"])
    decoder = FrameDecoder(CAP, chunk=256)
    frames = _fill(decoder, data * 20, 100)
    assert len(frames) == 40
    prefix, count, body = frames[0]
    assert prefix == data[:PREFIX_SIZE]
    assert count == len(BUFFERS)
    assert isinstance(body, bytearray)  # unpickled arrays must stay writable
    assert [bytes(b) for b in split_body(body, count)[0]] == BUFFERS
    assert decoder.pending == 0


def test_large_frame_is_read_into_its_own_buffer_in_place():
    big = bytes(range(256)) * 4096  # 1 MiB: far over the 4 KiB chunk
    data = frame([b"head", big]) + frame([b"after"])
    decoder = FrameDecoder(1 << 22, chunk=4096)
    first = decoder.buffer()
    first[:100] = data[:100]
    assert decoder.filled(100) == []
    prefix, body, filled = decoder.partial()
    assert prefix == data[:PREFIX_SIZE]
    assert len(body) == len(data) - PREFIX_SIZE - len(frame([b"after"]))
    assert filled == 100 - PREFIX_SIZE
    space = decoder.buffer()
    # The space offered is the rest of that frame's body: no copy on the way.
    assert len(space) == len(body) - filled
    space[:] = data[100 : 100 + len(space)]
    [(got_prefix, count, got_body)] = decoder.filled(len(space))
    assert got_body is body and got_prefix == prefix and count == 2
    assert bytes(split_body(got_body, count)[0][1]) == big
    assert decoder.partial() is None
    rest = data[100 + len(space) :]
    assert [bytes(split_body(b, c)[0][0]) for _, c, b in _fill(decoder, rest, 7)] == [
        b"after"
    ]


def _big_frames(decoder: FrameDecoder, *payloads: bytes) -> list:
    """Receive one large frame per payload; return each frame's payload view."""
    views = []
    for payload in payloads:
        [(_, count, body)] = _fill(decoder, frame([b"h", payload]), 1 << 20)
        views.append(split_body(body, count)[0][1])
        del body
    return views


def _memory(body) -> object:
    """The object that holds a body's bytes (a spare, or a body's own memory)."""
    return body.obj if isinstance(body, memoryview) else body


def _spares() -> set[int]:
    return {id(body) for body in framing._SPARES._bodies}


def test_large_bodies_are_reused_once_nothing_refers_to_them():
    # The pool is the process's: a free spare an earlier test left (4 MiB, seen in
    # CI) would be taken before this one's.
    framing.release_spares()
    decoder = FrameDecoder(1 << 23, chunk=4096)
    first = bytes(range(256)) * 8192  # 2 MiB
    [view] = _big_frames(decoder, first)
    first_id = id(view.obj)
    view.release()
    del view
    second = bytes(reversed(first))
    [(_, count, body)] = _fill(decoder, frame([b"h", second]), 1 << 20)
    assert id(_memory(body)) == first_id  # no new memory, no fresh pages
    assert bytes(split_body(body, count)[0][1]) == second


def test_an_announced_body_takes_memory_only_as_it_arrives():
    """A peer that sends the prefixes of large frames and none of their bytes (on
    many connections) makes the decoders hold no memory for them."""
    process = psutil.Process()
    framing.release_spares()
    before = process.memory_info().rss
    decoders = [FrameDecoder(64 << 20, chunk=4096) for _ in range(30)]
    for decoder in decoders:
        space = decoder.buffer()
        space[:PREFIX_SIZE] = PREFIX.pack((32 << 20) - 64, 1)
        assert decoder.filled(PREFIX_SIZE) == []
        assert decoder.partial() is None  # no body taken before its lengths come
    grown = process.memory_info().rss - before
    assert grown < 16 << 20  # was 30 x 32 MiB, zero-filled at once
    # What arrives lands in that memory, and comes out whole.
    data = frame([b"h", b"d" * ((2 << 20) - 64)])
    [(_, count, body)] = _fill(FrameDecoder(64 << 20, chunk=4096), data, 1 << 16)
    assert bytes(split_body(body, count)[0][1]) == b"d" * ((2 << 20) - 64)


def test_a_body_still_referred_to_is_never_reused():
    decoder = FrameDecoder(1 << 23, chunk=4096)
    payloads = [bytes([n]) * (2 << 20) for n in range(5)]
    # Kept views (a queued payload, an unpickled array) pin their bodies: every
    # later frame gets another buffer and the kept bytes never change.
    views = _big_frames(decoder, *payloads)
    assert len({id(v.obj) for v in views}) == len(views)
    assert [bytes(v) for v in views] == payloads
    # A body held by itself (a frame not yet taken from an inbox) is pinned too.
    [(_, _, held)] = _fill(decoder, frame([b"h", payloads[0]]), 1 << 20)
    [(_, _, other)] = _fill(decoder, frame([b"h", payloads[1]]), 1 << 20)
    assert held is not other
    assert bytes(held[-10:]) == payloads[0][-10:]


def _frames_of_spare_size(count: int) -> list:
    """One 2 MiB frame on each of ``count`` decoders, their views alive."""
    decoders = [FrameDecoder(1 << 23, chunk=4096) for _ in range(count)]
    return [_big_frames(d, bytes([n]) * (2 << 20))[0] for n, d in enumerate(decoders)]


def _refill_beyond_the_spares() -> tuple[set[int], list]:
    """SPARES + 1 frames of 2 MiB kept alive: ``(ids of the spares before, the
    memory of each frame's body)``."""
    decoder = FrameDecoder(1 << 23, chunk=4096)
    data = frame([b"h", b"x" * (2 << 20)])
    spares = _spares()
    kept = [_fill(decoder, data, 1 << 20)[0][2] for _ in range(SPARES + 1)]
    return spares, [_memory(body) for body in kept]


def test_spares_are_shared_by_decoders_and_bounded():
    views = _frames_of_spare_size(SPARES + 2)
    ids = {id(v.obj) for v in views}
    assert len(ids) == len(views)
    # However many connections received large frames, at most SPARES bodies are kept.
    del views
    spares, kept = _refill_beyond_the_spares()
    assert len(spares) == SPARES
    # SPARES frames reuse the kept bodies; only the one beyond them is allocated.
    assert {id(memory) for memory in kept[:SPARES]} == spares
    assert id(kept[SPARES]) not in spares


def test_a_larger_body_held_for_long_does_not_keep_the_spares_from_cycling():
    # A long job keeps its large argument's view: its body stays busy in the pool.
    held = _big_frames(FrameDecoder(1 << 24, chunk=4096), b"L" * (6 << 20))
    _frames_of_spare_size(SPARES + 2)  # received, then let go at once
    spares, kept = _refill_beyond_the_spares()
    # The bodies freed last are reused, whatever the busy one's size.
    assert id(held[0].obj) not in spares
    assert {id(memory) for memory in kept[:SPARES]} == spares
    assert len({id(memory) for memory in kept}) == SPARES + 1
    assert bytes(held[0][:1]) == b"L"


def test_a_forked_child_keeps_no_spares_of_its_parent():
    decoder = FrameDecoder(1 << 23, chunk=4096)
    del _big_frames(decoder, b"p" * (2 << 20))[0]  # a free spare in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.write(write, str(len(framing._SPARES._bodies)).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 16) == b"0"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert framing._SPARES._bodies  # the parent keeps its own


def test_a_smaller_large_frame_reuses_a_larger_free_body_cut_to_size():
    decoder = FrameDecoder(1 << 23, chunk=4096)
    [view] = _big_frames(decoder, b"a" * (3 << 20))
    del view
    spares = _spares()  # the 3 MiB body among them, free
    [(_, count, body)] = _fill(decoder, frame([b"h", b"b" * (2 << 20)]), 1 << 20)
    assert id(_memory(body)) in spares
    assert len(body) == len(frame([b"h", b"b" * (2 << 20)])) - PREFIX_SIZE
    assert bytes(split_body(body, count)[0][1]) == b"b" * (2 << 20)


def test_frame_just_fitting_the_chunk_after_others_is_compacted_not_split():
    decoder = FrameDecoder(CAP, chunk=64)
    small = frame([b"abcdefgh"])  # 8 + 4 + 8 = 20 bytes
    fits = frame([b"y" * 44])  # 8 + 4 + 44 = 56 bytes: fits only at the start
    frames = _fill(decoder, small * 2 + fits, 64)
    assert [bytes(split_body(b, c)[0][0]) for _, c, b in frames] == [
        b"abcdefgh",
        b"abcdefgh",
        b"y" * 44,
    ]
    assert decoder.partial() is None


def test_bad_prefix_sets_error_after_the_frames_before_it():
    decoder = FrameDecoder(100, chunk=4096)
    good = frame([b"fine"])
    frames = _fill(decoder, good + frame([b"z" * 200]) + good, 4096)
    assert [bytes(split_body(b, c)[0][0]) for _, c, b in frames] == [b"fine"]
    assert isinstance(decoder.error, FramingError)
    assert "100-byte cap" in str(decoder.error)
    assert decoder.filled(0) == []  # nothing after it is decoded


def test_raised_cap_applies_to_the_next_frame():
    decoder = FrameDecoder(100, chunk=64)
    body = frame([b"z" * 200])
    _fill(decoder, body[:64], 64)
    assert "100-byte cap" in str(decoder.error)
    decoder = FrameDecoder(100, chunk=64)
    decoder.max_size = 1000  # after authentication
    assert len(_fill(decoder, body, 64)) == 1


@pytest.mark.parametrize("count", [1, 2, 16, 17, 40])
def test_encode_frames_head_is_the_same_with_and_without_precompiled_structs(count):
    # Up to 16 buffers the head comes from one precompiled struct, beyond from two
    # packs: both must give the prefix and lengths table the decoder expects.
    buffers = [bytes([i]) * (i + 1) for i in range(count)]
    head, parts = encode_frames(buffers, MAC)
    lengths = [len(b) for b in buffers]
    body = 4 * count + sum(lengths) + MAC
    expected = struct.pack(f"!II{count}I", body, count, *lengths)
    assert head == expected
    assert parts == buffers
    assert buffers_size(parts) == sum(lengths)
    [(_prefix, decoded, _signed, mac)] = FrameDecoder(CAP, mac_size=MAC).feed(
        frame(buffers, bytes(MAC))
    )
    assert [bytes(b) for b in decoded] == buffers
    assert bytes(mac) == bytes(MAC)


def test_a_large_frame_whose_lengths_do_not_add_up_is_refused_before_its_body():
    """A large frame's lengths come first: if they do not add up to the size it
    announced (something else was written to the stream), it is refused then, with
    nothing taken for its body, not once the body it announced (which may never
    come) is in."""
    decoder = FrameDecoder(64 << 20, chunk=4096)
    space = decoder.buffer()
    space[:PREFIX_SIZE] = PREFIX.pack(32 << 20, 2)
    assert decoder.filled(PREFIX_SIZE) == []
    assert decoder.partial() is None and decoder.error is None
    space = decoder.buffer()
    space[:8] = struct.pack("!2I", 1, 2)
    assert decoder.filled(8) == []
    assert decoder.partial() is None
    assert decoder.error is not None and "add up to 11" in str(decoder.error)


def test_a_frame_of_many_buffers_takes_no_body_before_its_lengths_add_up():
    """A lengths table longer than the decoder's chunk (over 16K buffers, 256 KiB
    at most) is gathered and checked apart: the body (1 GiB announced) is taken
    only once the whole table adds up to it. It was taken at the prefix."""
    taken: list[int] = []
    decoder = FrameDecoder(2 << 30)

    def take_body(size: int) -> bytearray:
        taken.append(size)
        return bytearray(size)

    decoder.take_body = take_body
    count = MAX_BUFFERS
    announced = 1 << 30
    table = [0] * count
    table[-1] = announced - 4 * count  # adds up: one buffer holds the rest
    data = PREFIX.pack(announced, count) + struct.pack(f"!{count}I", *table)
    for piece in chunks(data[: PREFIX_SIZE + 4 * count - 1], 4093):
        space = decoder.buffer()
        space[: len(piece)] = piece
        assert decoder.filled(len(piece)) == []
    assert taken == [] and decoder.error is None and decoder.holding
    assert decoder.pending == PREFIX_SIZE + 4 * count - 1
    assert decoder.expected == PREFIX_SIZE + announced
    space = decoder.buffer()
    space[:1] = data[-1:]
    assert decoder.filled(1) == []
    assert taken == [announced] and decoder.partial() is not None

    # Lengths that pass the announced size are refused as soon as they do.
    decoder = FrameDecoder(2 << 30)
    decoder.take_body = take_body
    bad = PREFIX.pack(announced, count) + struct.pack("!2I", announced, 0)
    decoder.feed(bad[:PREFIX_SIZE])
    with pytest.raises(FramingError, match="add up to more"):
        decoder.feed(bad[PREFIX_SIZE:])
    assert taken == [announced]  # (the first decoder's)


def test_a_whole_frame_of_many_buffers_decodes():
    """Many buffers, fed in any pieces, with and without a MAC (its buffers all
    empty: the frame is whole with its table)."""
    buffers = [b"head"] + [b""] * (MAX_BUFFERS - 2) + [b"tail"]
    for mac in (b"", MAC * b"m"):
        data = frame(buffers, mac)
        for size in (1000, 70_000, len(data)):
            decoder = FrameDecoder(1 << 20, mac_size=len(mac))
            out = [m for piece in chunks(data, size) for m in decoder.feed(piece)]
            assert len(out) == 1 and not decoder.holding
            _prefix, got, _signed, tag = out[0]
            assert [bytes(b) for b in got] == buffers and bytes(tag) == mac
    empty = frame([b""] * MAX_BUFFERS)  # the table is the whole body
    decoder = FrameDecoder(1 << 20)
    assert len(decoder.feed(empty)) == 1 and not decoder.holding
