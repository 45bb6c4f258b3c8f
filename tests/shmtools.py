"""Helpers for the shared memory and shared object tests: what is in /dev/shm, who
opens a segment (fanotify), and how many bytes crossed a TCP connection (the kernel's
count, read with ``ss``)."""

from __future__ import annotations

import contextlib
import ctypes
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
    """Who opens one file: fanotify ``FAN_OPEN`` on its inode (renames do not
    matter) reports every open, by any process, with the opener's pid (root only).

    Unlike the access time, which ``relatime`` updates at most once a day, every
    open is reported; unlike inotify, it says who opened: dispynb clients elsewhere
    on the machine open every object in /dev/shm when they sweep dead clients'
    ones (`dispynb.protocol.shm.sweep`), and a test must not blame a node for that.

    >>> with OpenWatch(path) as watch:  # doctest: +SKIP
    ...     ...
    ...     assert node_pid not in watch.openers()
    """

    _FAN_CLOEXEC = 0x1
    _FAN_NONBLOCK = 0x2
    _FAN_MARK_ADD = 0x1
    _FAN_OPEN = 0x20
    _FAN_Q_OVERFLOW = 0x4000
    _AT_FDCWD = -100
    #: struct fanotify_event_metadata: event_len, vers, reserved, metadata_len,
    #: mask, fd, pid.
    _EVENT = struct.Struct("IBBHQii")

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self._fd = libc.fanotify_init(
            self._FAN_CLOEXEC | self._FAN_NONBLOCK, os.O_RDONLY
        )
        if self._fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"fanotify_init: {os.strerror(code)}")
        marked = libc.fanotify_mark(
            self._fd, self._FAN_MARK_ADD, self._FAN_OPEN, self._AT_FDCWD,
            os.fsencode(path),
        )  # fmt: skip
        if marked < 0:
            code = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(code, f"fanotify_mark {path}: {os.strerror(code)}")
        self._openers: list[int] = []

    def openers(self) -> list[int]:
        """The pid of each open seen since the watch began, in order (the kernel
        queues the event as the open happens: an open that returned is there)."""
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return list(self._openers)
            except InterruptedError:  # pragma: no cover - retried by Python anyway
                continue
            offset = 0
            while offset + self._EVENT.size <= len(data):
                length, _, _, _, mask, fd, pid = self._EVENT.unpack_from(data, offset)
                offset += length
                if fd >= 0:
                    os.close(fd)  # each event carries a descriptor of the file
                if mask & self._FAN_Q_OVERFLOW:
                    raise AssertionError("fanotify queue overflowed: opens were lost")
                if mask & self._FAN_OPEN:
                    self._openers.append(pid)

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
