"""The node's platform string (`Welcome.platform`), without a subprocess.

``platform.platform()`` unpacks ``platform.uname()``, whose ``processor`` field runs
``uname -p`` in a subprocess on Linux the first time it is read: a fork and an exec
on the way to a node's first client. Linux's platform string never shows that field
in practice (GNU ``uname -p`` prints ``unknown``, which the string drops, or the
machine, which it drops as a duplicate), so on Linux the string is built from
``os.uname()`` and ``platform.libc_ver()`` (a ``confstr`` call) the same way.
"""

from __future__ import annotations

import functools
import os
import platform
import sys

__all__ = ["node_platform"]


@functools.cache
def node_platform() -> str:
    """``platform.platform()`` of this machine (computed once)."""
    if not sys.platform.startswith("linux"):
        return platform.platform()
    uname = os.uname()
    libc, version = platform.libc_ver()
    return _join(uname.sysname, uname.release, uname.machine, "with", libc + version)


def _join(*parts: str) -> str:
    """Join as ``platform.platform()`` does: dashes, no unsafe characters, no
    ``unknown``, no doubled or trailing dashes."""
    text = "-".join(part.strip() for part in parts if part)
    text = text.replace(" ", "_")
    for char in '/\\:;"()':
        text = text.replace(char, "-")
    text = text.replace("unknown", "")
    while "--" in text:
        text = text.replace("--", "-")
    return text.rstrip("-")
