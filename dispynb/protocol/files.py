"""Names and digests of transferred files; no I/O on the network.

Both ends check every file name they receive with `safe_relative_path` before
touching the disk, and write through `write_inside` / `link_inside`, which walk the
path one directory descriptor at a time without following symlinks, so that a hostile
peer (or a job that planted a symlink) cannot create or write anything outside the
directory meant for its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import stat
import threading

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

    Missing directories are created one level at a time, each relative to its parent's
    file descriptor and opened without following symlinks, so a symlink on the way
    (planted by a job, or present in the folder) is refused before anything is created
    through it; so is a symlink as the file itself. Returns the final path.
    """
    relative = safe_relative_path(relative)
    parent, name = _open_parent(base, relative)
    try:
        tmp = _temp_name(name)
        fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            raise
    finally:
        os.close(parent)
    return os.path.join(base, *relative.split("/"))


def link_inside(base: str, relative: str, source: str) -> str:
    """Hard-link (or copy) ``source`` to ``base/relative``, never outside ``base``."""
    relative = safe_relative_path(relative)
    parent, name = _open_parent(base, relative)
    try:
        tmp = _temp_name(name)
        try:
            os.link(source, tmp, dst_dir_fd=parent, follow_symlinks=False)
        except OSError:  # no hard links there, or too many (EMLINK): a copy
            _copy_to(source, tmp, parent)
        try:
            os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            raise
        # A rename between two links of one file does nothing (POSIX): placed
        # there before, the file stays, and so would tmp.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=parent)
    finally:
        os.close(parent)
    return os.path.join(base, *relative.split("/"))


def _copy_to(source: str, tmp: str, parent: int) -> None:
    """Copy ``source`` to a new file ``tmp`` in directory ``parent``, a piece at a
    time (a file of any size costs no memory), with its mode and times, as a link
    would share them (a program stays executable)."""
    fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=parent)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
            dst.flush()
            info = os.fstat(src.fileno())
            os.fchmod(dst.fileno(), stat.S_IMODE(info.st_mode) & 0o777)
            os.utime(dst.fileno(), ns=(info.st_atime_ns, info.st_mtime_ns))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=parent)
        raise


#: Bytes copied at a time by `_copy_to`.
_COPY_CHUNK = 1 << 20

#: Flags of a new file: never through a symlink, never over an existing file.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

#: Flags of each directory on the way: a directory, never a symlink.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}.{threading.get_ident()}.part"


def _open_parent(base: str, relative: str) -> tuple[int, str]:
    """A descriptor of ``relative``'s directory inside ``base`` (created as needed,
    no symlink followed below ``base``) and the file's name in it.

    ``base`` itself is the caller's (it may be reached through a symlink). Raises
    `ProtocolError` for a symlink or a non-directory on the way, or a symlink as the
    file, with nothing created beyond the last real directory.
    """
    *dirs, name = relative.split("/")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in dirs:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):  # made by another writer
                    os.mkdir(part, 0o777, dir_fd=fd)  # less the umask, as makedirs
                child = _open_dir(fd, part, relative)
            except OSError as exc:
                raise _refused(fd, part, relative, exc) from None
            os.close(fd)
            fd = child
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return fd, name
        if stat.S_ISLNK(info.st_mode):
            raise ProtocolError(f"file name {relative!r} refused: it is a symlink")
        if stat.S_ISDIR(info.st_mode):
            raise ProtocolError(f"file name {relative!r} refused: it is a directory")
        return fd, name
    except BaseException:
        os.close(fd)
        raise


def _open_dir(parent: int, part: str, relative: str) -> int:
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise _refused(parent, part, relative, exc) from None


def _refused(parent: int, part: str, relative: str, exc: OSError) -> ProtocolError:
    """Why directory ``part`` on the way to ``relative`` cannot be entered."""
    try:
        info = os.stat(part, dir_fd=parent, follow_symlinks=False)
    except OSError:
        info = None
    if info is not None and stat.S_ISLNK(info.st_mode):
        return ProtocolError(
            f"file name {relative!r} refused: {part!r} on its way is a symlink "
            "(files are never written through symlinks)"
        )
    if info is not None and not stat.S_ISDIR(info.st_mode):
        return ProtocolError(
            f"file name {relative!r} refused: {part!r} on its way is not a directory"
        )
    return ProtocolError(f"cannot create {relative!r}: {exc.strerror or exc}")


def dest_path_parts(dest_path: str) -> list[str]:
    """The directories a computation's ``dest_path`` names, in order."""
    return [part for part in dest_path.split("/") if part not in ("", ".")]


def bad_dest_path(dest_path: object, most: int) -> str | None:
    """Why a computation's ``dest_path`` is refused; None if it is not.

    It names at most ``most`` directories: one of thousands made a node's
    ``os.makedirs`` recurse too deep (its start died unseen, its client waited for
    ever). A node takes one more than a client may name
    (`dispynb.defaults.MAX_DEST_PATH_PARTS`):
    the directory a shared scheduler puts each user's in, after checking the
    user's own against the clients' limit.
    """
    if dest_path is None or dest_path == "":
        return None
    if not isinstance(dest_path, str):
        return "computation-setup field 'dest_path' must be a string"
    parts = len(dest_path_parts(dest_path))
    if parts <= most:
        return None
    return (
        f"dest_path {dest_path[:40]!r}... names {parts} directories: at most "
        f"{most} (a directory under the node's own) are taken"
    )
