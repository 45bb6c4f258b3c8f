"""Length-prefixed framing of dispynb messages; no I/O.

A message is one header (msgpack bytes) plus zero or more payload buffers, laid out as::

    prefix   !II     body_length, buffer_count      (8 bytes)
    lengths  !{n}I   length of each buffer           (4 * buffer_count bytes)
    buffers          the buffers, back to back       (buffer 0 is the header)
    mac              32 bytes, only on signed connections

``body_length`` counts everything after the prefix, MAC included, so a reader learns
the whole size from the first 8 bytes and checks it against its cap *before* it
allocates anything. Buffers are kept separate so that large payloads (pickle protocol 5
out-of-band buffers) are written and MAC'd without being joined into one copy.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TypeAlias

from dispynb.errors import FramingError

Buffer: TypeAlias = bytes | bytearray | memoryview

PREFIX = struct.Struct("!II")
PREFIX_SIZE = PREFIX.size
LENGTH = struct.Struct("!I")

#: Prefix plus lengths table of a message of ``n`` buffers, for small ``n``.
HEADS = [struct.Struct(f"!II{n}I") for n in range(17)]

#: The lengths table of a message of ``n`` buffers, for small ``n``.
_TABLES = [struct.Struct(f"!{n}I") for n in range(17)]

#: Most buffers one message may carry; bounds the lengths table.
MAX_BUFFERS = 1 << 16


def buffers_size(buffers: Sequence[Buffer]) -> int:
    """Total bytes of ``buffers``; one buffer (the usual job or result) costs no
    generator."""
    if len(buffers) == 1:
        return memoryview(buffers[0]).nbytes
    return sum(memoryview(b).nbytes for b in buffers)


def encode_frames(
    buffers: Sequence[Buffer], mac_size: int = 0
) -> tuple[bytes, list[Buffer]]:
    """Return ``(head, buffers)``; ``head`` is the prefix plus the lengths table.

    The caller writes ``head``, then every buffer, then (on a signed connection) a MAC
    of ``mac_size`` bytes computed over ``head`` and the buffers.
    """
    count = len(buffers)
    if not 1 <= count <= MAX_BUFFERS:
        raise FramingError(f"a message needs 1 to {MAX_BUFFERS} buffers, got {count}")
    lengths = [memoryview(b).nbytes for b in buffers]
    body = 4 * count + sum(lengths) + mac_size
    if body > 0xFFFFFFFF:
        raise FramingError(
            f"message of {body} bytes exceeds the 4 GiB protocol limit; "
            "send large data as several jobs or as files"
        )
    if count < len(HEADS):  # the usual few buffers: one precompiled pack
        head = HEADS[count].pack(body, count, *lengths)
    else:
        head = PREFIX.pack(body, count) + struct.pack(f"!{count}I", *lengths)
    return head, list(buffers)


def parse_prefix(prefix: Buffer, max_size: int, mac_size: int = 0) -> tuple[int, int]:
    """Validate an 8-byte prefix against ``max_size``; return ``(body_length, count)``.

    Raises `FramingError` before any allocation when the announced size is over the cap
    or cannot hold the lengths table and MAC.
    """
    if len(prefix) != PREFIX_SIZE:
        raise FramingError(f"truncated frame prefix ({len(prefix)} of 8 bytes)")
    body, count = PREFIX.unpack(prefix)
    if body > max_size:
        raise FramingError(
            f"peer announced a {body}-byte message, over the {max_size}-byte cap"
            f"{_foreign_protocol(bytes(prefix))}"
        )
    if not 1 <= count <= MAX_BUFFERS:
        raise FramingError(f"invalid buffer count {count} in frame prefix")
    if body < 4 * count + mac_size:
        raise FramingError(f"frame of {body} bytes is too short for {count} buffers")
    return body, count


#: How requests of other protocols begin (their first bytes read as a huge size).
_HTTP_METHODS = (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"CONN", b"PATC")


def _foreign_protocol(prefix: bytes) -> str:
    """What a peer whose first bytes are no dispynb frame speaks, if that is clear:
    someone pointed a browser or curl at a port of dispynb's (a TLS client is told
    apart before, by `dispynb.transport.listener`)."""
    if prefix.startswith(_HTTP_METHODS):
        return (
            f": it sent HTTP ({prefix[:4].decode().strip()}), and this port speaks "
            "dispynb's protocol (a browser or curl pointed at it? the web monitor "
            "has a port of its own)"
        )
    return ""


def split_body(
    body: Buffer, count: int, mac_size: int = 0
) -> tuple[list[memoryview], memoryview, memoryview]:
    """Split a body into ``(buffers, signed_part, mac)`` without copying.

    ``signed_part`` is the lengths table plus buffers (what the MAC covers, after the
    prefix); ``mac`` is empty when ``mac_size`` is 0.
    """
    view = memoryview(body)
    offset = 4 * count
    if count < len(_TABLES):  # the usual few buffers: one precompiled unpack
        lengths = _TABLES[count].unpack_from(view)
    else:
        lengths = struct.unpack_from(f"!{count}I", view)
    end = len(view) - mac_size
    if offset + sum(lengths) != end:
        raise FramingError(
            f"frame lengths add up to {offset + sum(lengths)} bytes, body has {end}"
        )
    buffers = []
    for length in lengths:
        buffers.append(view[offset : offset + length])
        offset += length
    return buffers, view[:end], view[end:]


#: A frame's body: a bytearray, or a writable memoryview of memory a
#: `FrameDecoder.take_body` provided (exactly the body's size).
Body: TypeAlias = bytearray | memoryview

#: A frame as `FrameDecoder.filled` returns it: ``(prefix, count, body)``.
Frame: TypeAlias = tuple[bytes, int, Body]

#: Bodies of large frames from this size up to `SPARE_MAX` are kept for reuse.
SPARE_MIN = 1 << 20
#: Largest body kept for reuse (bigger ones are rare, and not worth holding on to).
SPARE_MAX = 32 << 20
#: Large bodies kept for reuse, by all the decoders of a process together (memory
#: kept stays bounded however many connections a client has).
SPARES = 2


def _free_refs() -> int:
    """References to a spare body that nobody else holds, as `_Spares.take` sees
    them (the pool's, the loop variable's and getrefcount's)."""
    pool = [mmap.mmap(-1, 1)]
    for spare in pool:
        return sys.getrefcount(spare)
    raise AssertionError  # pragma: no cover


_FREE_REFS = _free_refs()


class _Spares:
    """The bodies of recent large frames, filled again once nothing refers to them.

    Fresh memory costs a page fault per page, more than the receive's own copy, so
    a body is used again once free: when no frame and no memoryview of it is alive
    (a payload still queued or sent on, an unpickled object keeping a view). Its
    reference count, which every view holds through its buffer, says so exactly.

    A new body is anonymous memory (`mmap`), whose pages are committed only as the
    frame's bytes arrive: a zero-filled `bytearray` of the announced size held it
    all as soon as the 8-byte prefix came, so a peer that announced large frames
    on many connections and sent none of them held that much of our memory (an
    authenticated user of a shared scheduler: 969 MiB for 30 prefixes of 32 MiB).
    """

    def __init__(self) -> None:
        self._bodies: list[mmap.mmap] = []
        self._lock = threading.Lock()  # decoders of several threads share the pool
        #: Large bodies taken so far: unchanged for a while means none arrived.
        self.taken = 0

    def take(self, size: int) -> Body:
        """A buffer of ``size`` bytes: a view of a free spare, or of new memory
        (kept as a spare if its size qualifies); under `SPARE_MIN`, a bytearray
        (a few of those per connection are cheaper than mappings)."""
        self.taken += 1
        if size < SPARE_MIN:
            return bytearray(size)
        with self._lock:
            bodies = self._bodies
            for spare in bodies:
                if len(spare) >= size and sys.getrefcount(spare) <= _FREE_REFS:
                    # Used last, kept longest (by identity: == compares contents).
                    self._bodies = [body for body in bodies if body is not spare]
                    self._bodies.append(spare)
                    return memoryview(spare)[:size]
        # Private: a forked child (a worker) writing to a body leaves ours alone.
        body = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        if size <= SPARE_MAX:
            with self._lock:
                bodies = self._bodies
                if len(bodies) == SPARES:
                    # Replace the one used longest ago: a body a long job still holds
                    # ages out, whatever its size, instead of taking a place for ever.
                    del bodies[0]
                bodies.append(body)
        return memoryview(body)

    def clear(self) -> None:
        """Forget every spare (a forked child must not keep its parent's)."""
        self._bodies = []
        self._lock = threading.Lock()

    def release(self) -> int:
        """Forget every spare (they are freed once no frame uses them); their bytes."""
        with self._lock:
            bodies, self._bodies = self._bodies, []
        return sum(len(body) for body in bodies)


_SPARES = _Spares()
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_SPARES.clear)


def out_of_memory(size: int, exc: BaseException) -> str:
    """Why a frame of ``size`` bytes cannot be received (``exc``: the allocation's)."""
    why = getattr(exc, "strerror", None) or "MemoryError"
    return (
        f"a message of {size} bytes cannot be received: this process is out of "
        f"memory for it ({why}); send less at once (smaller jobs, files), or give "
        "the receiving process more memory (its ulimit -v, the machine's)"
    )


def large_frames_taken() -> int:
    """How many frames this process has received into a buffer of their own (a
    counter: unchanged between two looks means no large frame arrived)."""
    return _SPARES.taken


def release_spares() -> int:
    """Let the bodies kept for reuse go (call it when idle: the next large frame
    then pays for fresh memory again); the bytes they held."""
    return _SPARES.release()


class FrameDecoder:
    """Incremental decoder: bytes in any chunking in, whole frames out; no I/O.

    Two ways to give it bytes. `feed` takes bytes already read (one copy). Zero-copy
    readers (the asyncio transports) instead receive straight into `buffer` and
    report the count with `filled`: small frames land in one reusable chunk, and a
    frame too big for the chunk gets its own buffer, which `buffer` then exposes,
    so a large payload is read into its final place without any copy.

    ``max_size`` may be raised between frames (after authentication); every prefix is
    checked against it before anything is allocated for the body.

    Large bodies come from a pool of recent ones that nothing refers to any more
    (`_Spares`): no zero-filled allocation per large frame. An owner may set
    `take_body` to place them elsewhere (the node server: in memory it can hand to
    its workers); it is called only after the size was checked against ``max_size``.
    """

    def __init__(self, max_size: int, mac_size: int = 0, chunk: int = 1 << 16) -> None:
        self.max_size = max_size
        self.mac_size = mac_size
        self._chunk = bytearray(max(chunk, 2 * PREFIX_SIZE))
        self._view = memoryview(self._chunk)
        self._start = 0  # unconsumed bytes are _chunk[_start:_end]
        self._end = 0
        #: ``take_body(size)``: writable memory of exactly ``size`` bytes for the
        #: body of a frame too big for the chunk.
        self.take_body: Callable[[int], Body] = _SPARES.take
        #: The body of a frame bigger than the chunk, while it is filled (None
        #: between such frames; see `partial`).
        self.big: Body | None = None
        self._big_view = memoryview(b"")
        self._big_got = 0
        self._big_prefix = b""
        self._big_count = 0
        #: The lengths table of a large frame too long for the chunk (over 16K
        #: buffers), gathered apart and checked before its body is taken (None
        #: between such frames), and how much of it came.
        self._table: bytearray | None = None
        self._table_got = 0
        self._table_summed = 0  # its lengths added up so far, and their sum
        self._table_sum = 0
        #: Set once a bad prefix arrived; nothing after it is decoded.
        self.error: FramingError | None = None

    def buffer(self) -> memoryview:
        """Writable space for the next bytes (never empty); then call `filled`."""
        if self.big is not None:
            return self._big_view[self._big_got :]
        if self._table is not None:
            return memoryview(self._table)[self._table_got :]
        if self._end == len(self._chunk):
            self._compact()
        return self._view[self._end :]

    def filled(self, nbytes: int) -> list[Frame]:
        """``nbytes`` were written into `buffer`; return every frame now complete.

        A bad prefix sets `error` (for good: the stream is unusable) and ends the
        frames returned; the frames before it still come out.
        """
        if self.error is not None:
            return []
        if self.big is not None:
            before, self._big_got = self._big_got, self._big_got + nbytes
            lengths = 4 * self._big_count
            if before < lengths <= self._big_got and not self._lengths_fit(
                self.big[:lengths], self._big_count, len(self.big)
            ):
                self.drop_partial()
                return []
            return self._big_frame()
        if self._table is not None:
            self._table_got += nbytes
            self._table_filled()
            return [] if self.big is None else self._big_frame()
        self._end += nbytes
        frames: list[Frame] = []
        chunk, view = self._chunk, self._view
        while self._end - self._start >= PREFIX_SIZE:
            start = self._start
            prefix = bytes(view[start : start + PREFIX_SIZE])
            size, count = PREFIX.unpack(prefix)
            if (
                size > self.max_size
                or not 1 <= count <= MAX_BUFFERS
                or size < 4 * count + self.mac_size
            ):  # `parse_prefix`'s checks, inline: it says what is wrong
                try:
                    parse_prefix(prefix, self.max_size, self.mac_size)
                except FramingError as exc:
                    self.error = exc
                    break
                raise AssertionError("parse_prefix accepted a refused prefix")
            end = start + PREFIX_SIZE + size
            if end <= self._end:
                frames.append((prefix, count, chunk[start + PREFIX_SIZE : end]))
                self._start = end
                continue
            if PREFIX_SIZE + size > len(chunk):
                # Too big for the chunk: it gets its own buffer, filled in place.
                have = self._end - start - PREFIX_SIZE
                if have < 4 * count and PREFIX_SIZE + 4 * count <= len(chunk):
                    # Its lengths first, where the chunk holds them: a frame only
                    # announced (a job wrote to its worker's channel) takes no
                    # memory, nor one whose lengths do not add up (`_lengths_fit`).
                    if start + PREFIX_SIZE + 4 * count > len(chunk):
                        self._compact()
                    break
                if have < 4 * count:
                    # Lengths longer than the chunk (over 16K buffers): gathered
                    # apart, 256 KiB at most, and checked before the body is
                    # taken (it was taken at once: 1000 MiB announced, 1000 MiB
                    # of address space taken, waiting for bytes that never came).
                    self._table = bytearray(4 * count)
                    self._table[:have] = view[start + PREFIX_SIZE : self._end]
                    self._table_got = have
                    self._table_summed = self._table_sum = 0
                    self._big_prefix, self._big_count = prefix, count
                    self._start = self._end = 0
                    self._table_filled()
                    break
                if have >= 4 * count and not self._lengths_fit(
                    view[start + PREFIX_SIZE : start + PREFIX_SIZE + 4 * count],
                    count,
                    size,
                ):
                    break
                self._big_prefix, self._big_count = prefix, count
                if not self._take_big(size, view[start + PREFIX_SIZE : self._end]):
                    break
                self._start = self._end = 0
            elif end > len(chunk):
                self._compact()  # it fits once the chunk starts with it
            break
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def _big_frame(self) -> list[Frame]:
        """The large frame being filled, once whole (then forgotten here)."""
        big = self.big
        if big is None or self._big_got < len(big):
            return []
        frame = (self._big_prefix, self._big_count, big)
        self.big = None
        self._big_view = memoryview(b"")
        return [frame]

    def _table_filled(self) -> None:
        """More of a long lengths table (`_table`) came: refused (`error`) as soon
        as the lengths so far pass the size announced; once whole and adding up,
        the body is taken and the table is its start."""
        table, got, count = self._table, self._table_got, self._big_count
        assert table is not None
        size = int(PREFIX.unpack(self._big_prefix)[0])
        if got < len(table):
            # Summed as they come (each once: a peer sending a byte at a time
            # costs no rescan of the table).
            whole, summed = got // 4, self._table_summed
            if whole > summed:
                new = struct.unpack_from(f"!{whole - summed}I", table, 4 * summed)
                self._table_sum += sum(new)
                self._table_summed = whole
            if 4 * count + self._table_sum > size - self.mac_size:
                self._table = None
                self.error = FramingError(
                    f"a frame of {size - self.mac_size} bytes announced, whose "
                    f"lengths add up to more: not a dispynb message"
                )
            return
        self._table = None
        if self._lengths_fit(table, count, size):
            self._take_big(size, table)

    def _take_big(self, size: int, start: Buffer) -> bool:
        """Take the body of a large frame (``size`` bytes), which starts with
        ``start`` (what came of it); False (`error`) if there is no memory for it."""
        try:
            self.big = big = self.take_body(size)
        except (MemoryError, OSError) as exc:
            # An address space limit, strict overcommit: this frame has nowhere
            # to go, and the stream is unusable after it.
            self.error = FramingError(out_of_memory(size, exc))
            return False
        have = len(start)
        big[:have] = start
        self._big_view = memoryview(big)
        self._big_got = have
        return True

    def _lengths_fit(self, table: Buffer, count: int, size: int) -> bool:
        """Whether the lengths ``table`` of a large frame (its first bytes) add up
        to its body of ``size`` bytes; if not, `error`: a peer that announced a
        large frame and then sent something else (a job writing to its worker's
        channel) is refused as soon as that shows, with nothing taken for the body
        it announced (which may never come), or no more than what came of it."""
        lengths = struct.unpack_from(f"!{count}I", table)
        end = size - self.mac_size
        if 4 * count + sum(lengths) == end:
            return True
        self.error = FramingError(
            f"a frame of {end} bytes announced, whose lengths add up to "
            f"{4 * count + sum(lengths)}: not a dispynb message"
        )
        return False

    @property
    def holding(self) -> bool:
        """Whether bytes of a frame not complete yet are held here."""
        return (
            self.big is not None or self._table is not None or self._end > self._start
        )

    def partial(self) -> tuple[bytes, Body, int] | None:
        """The large frame being filled: ``(prefix, body, bytes_filled)``, or None.

        Lets a reader start on a large frame (hash it) while the rest is in flight.
        """
        if self.big is None:
            return None
        return self._big_prefix, self.big, self._big_got

    def drop_partial(self) -> None:
        """Forget the large frame being filled: its stream ended, so it never
        completes. Its body is freed now, not whenever the decoder is (a
        connection and its link refer to each other: only a garbage collection
        frees them, which an idle process may not run for a long time)."""
        self.big = None
        self._big_view = memoryview(b"")
        self._big_got = 0
        self._table = None

    def _compact(self) -> None:
        pending = self._end - self._start
        self._chunk[:pending] = self._view[self._start : self._end]
        self._start, self._end = 0, pending

    def feed(
        self, data: Buffer
    ) -> list[tuple[bytes, list[memoryview], memoryview, memoryview]]:
        """Add ``data``; return every message now complete.

        Each message is ``(prefix, buffers, signed_part, mac)`` (see
        `split_body`). Raises `FramingError` for a bad prefix.
        """
        out = []
        source = memoryview(data).cast("B")
        while source:
            space = self.buffer()
            step = min(len(space), len(source))
            space[:step] = source[:step]
            source = source[step:]
            for prefix, count, body in self.filled(step):
                out.append((prefix, *split_body(body, count, self.mac_size)))
            if self.error is not None:
                raise self.error
        return out

    @property
    def expected(self) -> int:
        """Size of the frame being received, prefix included (8 while the prefix
        itself is incomplete)."""
        if self.big is not None:
            return PREFIX_SIZE + len(self.big)
        if self._table is not None:
            return PREFIX_SIZE + int(PREFIX.unpack(self._big_prefix)[0])
        if self._end - self._start < PREFIX_SIZE:
            return PREFIX_SIZE
        body, _count = PREFIX.unpack_from(self._chunk, self._start)
        return PREFIX_SIZE + int(body)

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole message."""
        if self.big is not None:
            return PREFIX_SIZE + self._big_got
        if self._table is not None:
            return PREFIX_SIZE + self._table_got
        return self._end - self._start
