"""`scrub_memory`: overwrite every copy of a value in this process's memory.

For a process forked from one that held a secret and that goes on to fork processes
running other people's code (a node's zygote): those read their own memory, which
holds what the parent held when it forked, dropped objects included (CPython and
libc do not clear what they free). The value is looked for in the encodings
CPython and the C runtime keep text in (UTF-8, Latin-1, UTF-16 and UTF-32, as a
wide-character ``argv``), through ``/proc/self/mem`` into one reused buffer: a
region unmapped meanwhile is an error to skip, not a crash, and the look makes no
copy of what it finds. Linux only (elsewhere it finds nothing).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

__all__ = ["MIN_LENGTH", "scrub_memory"]

#: The shortest value looked for.
MIN_LENGTH = 12

#: What is read of memory at a time (the buffer is reused).
_CHUNK = 1 << 20


def _needles(value: str) -> list[bytearray]:
    """``value`` in each encoding text is kept in, without repeats."""
    needles: list[bytearray] = []
    for encoding in ("utf-8", "latin-1", "utf-16-le", "utf-32-le"):
        with contextlib.suppress(UnicodeEncodeError):
            needle = bytearray(value, encoding)
            if needle not in needles:
                needles.append(needle)
    return needles


def _writable_regions() -> list[tuple[int, int]]:
    """The private writable mappings of this process (where a copy can lie and
    be overwritten)."""
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1][:2] != "rw" or fields[1][3] != "p":
                continue
            if len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]", "[vdso]"):
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            regions.append((low, high))
    return regions


def _address(buffer: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


def scrub_memory(value: str) -> int:
    """Overwrite with zero bytes every copy of ``value`` in this process's private
    writable memory (``value``'s own characters too: drop it after); return how
    many were overwritten. Call it with one thread running. Values under
    `MIN_LENGTH` characters are left: they could be part of other text, which
    would be damaged (and a secret that short is a weak one)."""
    if len(value) < MIN_LENGTH or not os.path.exists("/proc/self/mem"):
        return 0
    needles = _needles(value)
    own = [(_address(n), _address(n) + len(n)) for n in needles]
    longest = max(len(n) for n in needles)
    chunk = bytearray(_CHUNK + longest)
    view = memoryview(chunk)
    zeros = bytes(longest)
    count = 0
    try:
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            for low, high in _writable_regions():
                at = low
                while at < high:
                    size = min(high - at, len(chunk))
                    try:
                        mem.seek(at)
                        got = mem.readinto(view[:size]) or 0
                    except OSError:  # unmapped meanwhile, or unreadable
                        break
                    for needle in needles:
                        found = chunk.find(needle, 0, got)
                        while found >= 0:
                            where = at + found
                            if not any(a <= where < b for a, b in own):
                                with contextlib.suppress(OSError):
                                    mem.seek(where)
                                    mem.write(zeros[: len(needle)])
                                    count += 1
                            found = chunk.find(needle, found + 1, got)
                    if got < size:
                        break
                    at += max(size - longest + 1, 1) if size == len(chunk) else size
    finally:
        for buffer in (*needles, chunk):
            buffer[:] = bytes(len(buffer))
        view.release()
    return count
