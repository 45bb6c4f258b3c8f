"""Helpers for the shared memory and shared object tests: what is in /dev/shm, and
how many bytes crossed a TCP connection (the kernel's count, read with ``ss``)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess

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
