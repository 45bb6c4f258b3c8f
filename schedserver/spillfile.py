"""`SpillFile`: one computation's spill file (see `schedserver.spill`): payloads
appended at its end, read back, and the disk space of those no longer kept given
back to the file system at once by punching holes in it
(``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``).

A hole frees whole blocks only: a block that payloads share (one ends in it, the
next begins) is freed once none of them is kept any more, so that a file whose
payloads go as others come holds only the blocks of those kept, whatever their
sizes, without copying anything or moving what stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schedserver.spill import SpillStore

#: ``fallocate`` mode: free a byte range of a file, keeping its size.
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

#: Block size assumed when the file system does not say.
_BLOCK = 4096


def _find_fallocate() -> Any:
    """libc's ``fallocate`` taking 64-bit offsets (None: there is none, not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for name in ("fallocate64", "fallocate"):
        function = getattr(libc, name, None)
        if function is not None and (
            name == "fallocate64" or ctypes.sizeof(ctypes.c_long) == 8
        ):
            function.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_int64] * 2
            function.restype = ctypes.c_int
            return function
    return None


_fallocate = _find_fallocate()


def punch_hole(fd: int, offset: int, size: int) -> int:
    """Free ``size`` bytes of ``fd`` from ``offset`` (reads there give zeros); 0,
    or the error number (ENOSYS: no ``fallocate`` here)."""
    if _fallocate is None:
        return errno.ENOSYS
    if _fallocate(fd, _PUNCH_HOLE, offset, size) == 0:
        return 0
    return ctypes.get_errno()


#: A payload's place in a spill file: ``(offset, size)``.
Place = tuple[int, int]


class SpillFile:
    """One spill file (an unlinked file: only its descriptor reaches it)."""

    def __init__(self, store: SpillStore, name: str) -> None:
        self._store = store
        self._name = name
        self.fd = store.new_file()
        try:
            self._block = os.fstat(self.fd).st_blksize or _BLOCK
        except OSError:
            self._block = _BLOCK
        self._end = 0  # where the next payload goes
        # Blocks that kept payloads share with others, and how many of those
        # kept payloads touch each (freed when none does any more).
        self._shared: dict[int, int] = {}

    def write(self, buffers: list[memoryview]) -> list[Place]:
        """Append ``buffers``; their places. Raises OSError (a full disk) with
        nothing of them left in the file."""
        start, places = self._end, []
        try:
            for buffer in buffers:
                offset = self._end
                view = buffer.cast("B") if buffer.ndim != 1 else buffer
                written = 0
                while written < view.nbytes:
                    written += os.pwrite(self.fd, view[written:], offset + written)
                places.append((offset, view.nbytes))
                self._end += view.nbytes
        except OSError:
            # Nothing kept lies past ``start``: what this write took goes.
            self._end = start
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, start)
            raise
        for offset, size in places:
            for block in self._partial(offset, size):
                self._shared[block] = self._shared.get(block, 0) + 1
        return places

    def read(self, offset: int, size: int) -> memoryview:
        """The ``size`` bytes at ``offset``."""
        data = bytearray(size)
        view = memoryview(data)
        done = 0
        while done < size:
            count = os.preadv(self.fd, [view[done:]], offset + done)
            if count <= 0:
                raise OSError(f"spill file of {self._name} ended early")
            done += count
        return view

    def free(self, places: list[Place]) -> None:
        """These payloads are not kept any more: give their blocks back."""
        block = self._block
        for offset, size in places:
            first, last = -(-offset // block), (offset + size) // block
            if last > first:  # the blocks only this payload has
                self._punch(first * block, (last - first) * block)
            for shared in self._partial(offset, size):
                left = self._shared.pop(shared) - 1
                if left:
                    self._shared[shared] = left
                else:
                    self._punch(shared * block, block)

    def close(self) -> None:
        """Close it (its space is freed: it has no name)."""
        os.close(self.fd)

    def _partial(self, offset: int, size: int) -> set[int]:
        """The blocks a payload at ``offset`` covers only in part."""
        if not size:
            return set()
        block = self._block
        end = offset + size
        first, last = offset // block, (end - 1) // block
        partial = set()
        if offset % block or (first == last and end % block):
            partial.add(first)
        if end % block:
            partial.add(last)
        return partial

    def _punch(self, offset: int, size: int) -> None:
        if self._store.holes:
            self._store.hole_failed(punch_hole(self.fd, offset, size))


__all__ = ["Place", "SpillFile", "punch_hole"]
