"""Helpers for the shared memory and shared object tests: what is in /dev/shm, who
opens a segment (inotify), and how many bytes crossed a TCP connection (the kernel's
count, read with ``ss``)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import struct
import subprocess
from pathlib import Path
from types import TracebackType

from dispynb.protocol import shm


def live_inodes() -> set[int]:
    """Inodes of every dispynb argument object in /dev/shm now (a pooled object is
    renamed for every job: its inode is what stays)."""
    found = set()
    for entry in os.scandir(shm.SHM_DIR):
        if entry.name.startswith("dnb-"):
            with contextlib.suppress(FileNotFoundError):
                found.add(entry.stat(follow_symlinks=False).st_ino)
    return found


def bytes_received(port: str | int, side: str) -> int:
    """Bytes received so far by the established TCP connections whose ``side``
    (``"sport"``: local, ``"dport"``: remote) port is ``port``."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( {side} = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))


class OpenWatch:
    """Count the opens of one file by any process (inotify ``IN_OPEN`` on its inode,
    so renames do not matter). Unlike the access time, which ``relatime`` updates
    at most once a day, every open is reported.

    >>> with OpenWatch(path) as watch:  # doctest: +SKIP
    ...     ...
    ...     assert watch.opens() == 0
    """

    IN_OPEN = 0x20
    IN_Q_OVERFLOW = 0x4000
    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        watch = libc.inotify_add_watch(self._fd, os.fsencode(path), self.IN_OPEN)
        if watch < 0:
            code = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(code, f"inotify_add_watch {path}: {os.strerror(code)}")
        self._count = 0

    def opens(self) -> int:
        """Opens seen since the watch began (the kernel queues each event as the
        open happens: an open that returned is already counted)."""
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return self._count
            except OSError as exc:  # pragma: no cover - closed or broken watch
                if exc.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset < len(data):
                _, mask, _, size = self._EVENT.unpack_from(data, offset)
                offset += self._EVENT.size + size
                if mask & self.IN_Q_OVERFLOW:
                    raise AssertionError("inotify queue overflowed: opens were lost")
                if mask & self.IN_OPEN:
                    self._count += 1

    def close(self) -> None:
        """Stop watching."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OpenWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
