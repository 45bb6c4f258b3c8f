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

import struct
from collections.abc import Sequence
from typing import TypeAlias

from dispynb.errors import FramingError

Buffer: TypeAlias = bytes | bytearray | memoryview

PREFIX = struct.Struct("!II")
PREFIX_SIZE = PREFIX.size
LENGTH = struct.Struct("!I")

#: Most buffers one message may carry; bounds the lengths table.
MAX_BUFFERS = 1 << 16


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
        )
    if not 1 <= count <= MAX_BUFFERS:
        raise FramingError(f"invalid buffer count {count} in frame prefix")
    if body < 4 * count + mac_size:
        raise FramingError(f"frame of {body} bytes is too short for {count} buffers")
    return body, count


def split_body(
    body: Buffer, count: int, mac_size: int = 0
) -> tuple[list[memoryview], memoryview, memoryview]:
    """Split a body into ``(buffers, signed_part, mac)`` without copying.

    ``signed_part`` is the lengths table plus buffers (what the MAC covers, after the
    prefix); ``mac`` is empty when ``mac_size`` is 0.
    """
    view = memoryview(body)
    table = 4 * count
    lengths = struct.unpack_from(f"!{count}I", view)
    end = len(view) - mac_size
    if table + sum(lengths) != end:
        raise FramingError(
            f"frame lengths add up to {table + sum(lengths)} bytes, body has {end}"
        )
    buffers = []
    offset = table
    for length in lengths:
        buffers.append(view[offset : offset + length])
        offset += length
    return buffers, view[:end], view[end:]


class FrameDecoder:
    """Incremental decoder: feed bytes in any chunking, get whole messages out.

    Used where a blocking socket is read directly (worker processes) and in tests; the
    tornado transport reads the prefix and body with exact-size reads instead.
    Each decoded message is ``(prefix, buffers, signed_part, mac)``.
    """

    def __init__(self, max_size: int, mac_size: int = 0) -> None:
        self.max_size = max_size
        self.mac_size = mac_size
        self._data = bytearray()
        self._expect: tuple[int, int] | None = None

    def feed(
        self, data: Buffer
    ) -> list[tuple[bytes, list[memoryview], memoryview, memoryview]]:
        """Add ``data``; return every message now complete."""
        self._data += data
        out = []
        while True:
            if self._expect is None:
                if len(self._data) < PREFIX_SIZE:
                    break
                self._expect = parse_prefix(
                    bytes(self._data[:PREFIX_SIZE]), self.max_size, self.mac_size
                )
            body, count = self._expect
            if len(self._data) < PREFIX_SIZE + body:
                break
            prefix = bytes(self._data[:PREFIX_SIZE])
            chunk = bytes(self._data[PREFIX_SIZE : PREFIX_SIZE + body])
            del self._data[: PREFIX_SIZE + body]
            self._expect = None
            out.append((prefix, *split_body(chunk, count, self.mac_size)))
        return out

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole message."""
        return len(self._data)
