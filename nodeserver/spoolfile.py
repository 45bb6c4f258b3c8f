"""The file of one result in a node's kept-results spool (`nodeserver.spool`).

A file holds `MAGIC`, the length of a msgpack header (the result's entry, its
buffers' sizes and kinds), the header, the buffers, and last its check
(`nodeserver.spoolcheck`). Its name says whose result it is (`result_name`,
`job_of`), so that a file a crash tore still tells which job it was.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Any

import msgpack

from dispynb.protocol.records import Utf8Text

#: First bytes of a spooled result file (format version 2: it ends with its check;
#: files of version 1 had none, and are not offered).
MAGIC = b"DNBK0002"
_HEADER_SIZE = struct.Struct("<Q")
#: Fewest bytes of a spooled result's file before its check: an empty header.
HEAD_SIZE = len(MAGIC) + _HEADER_SIZE.size
#: msgpack extension type of a job's output kept as UTF-8 (`Utf8Text`).
_UTF8_EXT = 1


def encode(
    entry: list[Any], buffers: list[memoryview], kinds: str
) -> tuple[list[Any], int]:
    """The parts of the file of a result (``entry`` and ``buffers``, ``kinds``:
    their `ResultChunk.kind` letters, if known), but its check, and their bytes."""
    header = msgpack.packb(
        {"entry": entry, "sizes": [b.nbytes for b in buffers], "kinds": kinds},
        use_bin_type=True,
        default=_pack_text,
    )
    size = HEAD_SIZE + len(header) + sum(b.nbytes for b in buffers)
    return [MAGIC, _HEADER_SIZE.pack(len(header)), header, *buffers], size


def result_name(seq: int, entry: list[Any]) -> str:
    """A new file name (unsigned) for the result ``entry``, the ``seq``-th this
    node spools: with its job, if it is a job's, should the file be lost."""
    name = f"r{time.time_ns():020d}-{seq:08d}"
    if _is_int(entry[0]) and _is_int(entry[1]):  # a job's result (not a file)
        name += f"_{entry[0]}_{entry[1]}"
    return name


def job_of(path: str) -> tuple[int, int] | None:
    """The job (key, attempt) whose result spool file ``path`` holds, told by its
    name (so that a file a crash tore still says whose it was); None if it does
    not say (a file a job sent, or a file of an older node)."""
    parts = os.path.basename(path).split(".")[0].split("_")
    if len(parts) != 3:
        return None
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return None


def parse_header(
    data: mmap.mmap | bytearray, end: int
) -> tuple[list[Any], list[int], str, int]:
    """``(entry, buffer sizes, kinds, offset of the first buffer)`` of a spooled
    result's file, checked against ``end``, where its check starts; raises
    ValueError (or KeyError, TypeError) if it is not one."""
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError("not a spooled result")
    offset = HEAD_SIZE
    (length,) = _HEADER_SIZE.unpack(data[len(MAGIC) : offset])
    # No other bound: the header holds the job's whole output (a job may print a
    # lot), and it is this node's own file, read from a map, not from a peer.
    if offset + length > end:
        raise ValueError("bad header length")
    header = msgpack.unpackb(
        data[offset : offset + length], raw=False, ext_hook=_unpack_text
    )
    entry, sizes = header["entry"], header["sizes"]
    kinds = header.get("kinds", "")  # none in files of older nodes
    if not isinstance(sizes, list) or not all(
        isinstance(size, int) and size >= 0 for size in sizes
    ):
        raise ValueError("bad buffer sizes")
    if not isinstance(kinds, str) or not _is_entry(entry, len(sizes)):
        raise ValueError("not a result's entry as a node writes it")
    if offset + length + sum(sizes) != end:
        raise ValueError("sizes do not match the file")
    return entry, sizes, kinds, offset + length


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TEXT = (str, bytes, Utf8Text)


def _is_entry(entry: object, buffers: int) -> bool:
    """Whether ``entry`` of a spooled file with ``buffers`` buffers is one a node
    writes: a job's result (`ResultEntry`'s 9 items, its buffers all there), or
    ``[what, key, detail]`` of a file a job sent or a provisional result
    (`keptresults.FILE`, `keptresults.PROVISIONAL`). Another (a file damaged, or
    written by something else of the node's user) ended the recovery of every
    result after it."""
    if not isinstance(entry, list):
        return False
    if len(entry) == 3:
        return (
            isinstance(entry[0], str)
            and _is_int(entry[1])
            and isinstance(entry[2], str | int)
        )
    return (
        len(entry) == 9
        and _is_int(entry[0])
        and _is_int(entry[1])
        and isinstance(entry[2], str)
        and all(isinstance(time, int | float) for time in entry[3:5])
        and all(isinstance(text, _TEXT) for text in entry[5:7])
        and (entry[7] is None or isinstance(entry[7], str | Utf8Text))
        and entry[8] == buffers
        and _is_int(entry[8])
    )


def _pack_text(value: object) -> msgpack.ExtType:
    """A result's output kept as its UTF-8 bytes (`Utf8Text`), spooled so: never
    decoded to be written, nor read back as a program's bytes."""
    if type(value) is Utf8Text:
        data = value.data  # bytes, or a view of the message it came in
        return msgpack.ExtType(_UTF8_EXT, data if type(data) is bytes else bytes(data))
    raise TypeError(f"cannot spool a {type(value).__name__}")


def _unpack_text(code: int, data: bytes) -> Utf8Text:
    if code != _UTF8_EXT:
        raise ValueError(f"unknown extension type {code} in a spooled result")
    return Utf8Text(data)
