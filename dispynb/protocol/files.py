"""Names and digests of transferred files; no I/O on the network.

Both ends check every file name they receive with `safe_relative_path` before
touching the disk, and write through `write_inside` (which refuses symlink escapes),
so that a hostile peer cannot write outside the directory meant for its files.
"""

from __future__ import annotations

import hashlib
import os
import posixpath

from dispynb.errors import ProtocolError

#: Longest relative path accepted for a transferred file.
MAX_PATH_LENGTH = 1024


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """The content address of a file: hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def safe_relative_path(name: object) -> str:
    """Return ``name`` as a normalised relative POSIX path, or raise `ProtocolError`.

    Refused: non-strings, empty names, absolute paths, drive letters, backslashes, NUL,
    ``..`` components, names that end in ``/``, and overlong names.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_PATH_LENGTH:
        raise ProtocolError(f"bad file name {name!r}")
    if "\0" in name or "\\" in name or name.endswith("/"):
        raise ProtocolError(f"unsafe file name {name!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ProtocolError(f"absolute file name {name!r} refused: names are relative")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise ProtocolError(f"file name {name!r} refused: it leaves its directory")
    return posixpath.join(*parts)


def write_inside(base: str, relative: str, data: bytes | bytearray | memoryview) -> str:
    """Write ``data`` to ``base/relative`` atomically, never outside ``base``.

    Directories are created as needed; an existing symlink on the way (or as the file
    itself) that leads out of ``base`` is refused. Returns the final path.
    """
    target = _resolve_inside(base, safe_relative_path(relative))
    tmp = f"{target}.{os.getpid()}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def _resolve_inside(base: str, relative: str) -> str:
    root = os.path.realpath(base)
    target = os.path.join(root, *relative.split("/"))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if not _is_within(os.path.realpath(parent), root):
        raise ProtocolError(f"file name {relative!r} refused: a symlink leads outside")
    if os.path.islink(target):
        raise ProtocolError(f"file name {relative!r} refused: it is a symlink")
    return target


def link_inside(base: str, relative: str, source: str) -> str:
    """Hard-link (or copy) ``source`` to ``base/relative``, never outside ``base``."""
    target = _resolve_inside(base, safe_relative_path(relative))
    tmp = f"{target}.{os.getpid()}.part"
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as handle:
            data = handle.read()
        return write_inside(base, relative, data)
    os.replace(tmp, target)
    return target


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
