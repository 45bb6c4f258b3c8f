"""The checks of the files of a node's kept-results spool (`nodeserver.spool`).

A node's jobs run as its user, so they can write in its spool: a job of one client
wrote a result there, in the directory of another client's computation, which that
client's ``recover_jobs`` unpickled as its own (the job's code then ran on that
client's machine). So every file a node spools carries a MAC under a key only the
node's process and the computation's client know: derived from the computation's
recovery id, which the node never writes down (its spool directory is named by a
digest of it) and never gives to a computation's processes, and which a client makes
of 128 random bits. A file is offered to a recovering client only if both checks
hold:

- its name's: the node signs each name it gives a result (`signed_name`), so that a
  file that cannot be read (torn as the machine stopped) still tells which job it
  was, and a planted one, which cannot, is not reported as any job's;
- its bytes': the last `CHECK_SIZE` bytes are the MAC of the rest under a key of the
  file's name (`file_check`; HMAC, or GMAC for large files, as
  `dispynb.protocol.auth` signs messages), so a file changed, or copied from one
  name to another, or from another computation's spool, fails. The check is made
  on a copy of the file only the node reaches, and that copy is sent
  (`private_copy`): a job cannot change what is sent past the check.

A job can still read and delete what its node keeps (anything of its user): the
checks keep it from forging, not from seeing (`docs/security.md`).
"""

from __future__ import annotations

import errno
import hmac
import logging
import math
import mmap
import os
import re
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from dispynb.protocol.auth import MAC_SIZE, MessageSigner
from dispynb.protocol.framing import Buffer
from dispynb.protocol.handshake import peer_text

#: Bytes of the check that ends a spooled result's file.
CHECK_SIZE = MAC_SIZE
#: Most seconds results are kept (ten years): more is taken as this. A `meta`
#: asking for more (a client's keep_results of 1e300, or a job's file) made the
#: node's start fail on a date no clock can show.
MAX_KEEP = 10 * 365 * 86400.0

logger = logging.getLogger(__name__)

_LABEL = b"dispynb kept-result check v1"
_NAME_TAG = 16  # bytes of a name's check (32 hex digits)


def check_key(recovery_id: str) -> bytes:
    """The key of the checks of one computation's kept files."""
    return hmac.digest(_LABEL, recovery_id.encode(), "sha256")


def signed_name(key: bytes, base: str) -> str:
    """``base`` with the node's check of it: the name a result's file is given."""
    tag = hmac.digest(key, b"name:" + base.encode(), "sha256")[:_NAME_TAG]
    return f"{base}.{tag.hex()}"


#: The shape of every name `ResultSpool.write` gives (``r<ns>-<seq>[_<key>_<attempt>]``
#: and its check): what a node started again counts of a spool whose key it does
#: not know yet (`has_signed_shape`). Its sequence number has 8 digits at least:
#: more past the 10**8th result of a node process.
_SIGNED_SHAPE = re.compile(
    rf"r\d{{20}}-\d{{8,}}(?:_-?\d+_-?\d+)?\.[0-9a-f]{{{2 * _NAME_TAG}}}"
)


def has_signed_shape(name: str) -> bool:
    """Whether file ``name`` has the shape of a name `signed_name` gives (its check
    needs the computation's recovery id, which the node learns only when a client
    claims the spool: a name without that shape is none the node gave)."""
    return _SIGNED_SHAPE.fullmatch(name) is not None


def is_signed_name(key: bytes, name: str) -> bool:
    """Whether file ``name`` is one the node gave a result under ``key``."""
    base, dot, _tag = name.rpartition(".")
    return bool(dot) and hmac.compare_digest(signed_name(key, base), name)


def file_check(key: bytes, name: str, parts: Sequence[Buffer]) -> bytes:
    """The `CHECK_SIZE` bytes that end file ``name`` holding ``parts``."""
    file_key = hmac.digest(key, b"file:" + name.encode(), "sha256")
    return MessageSigner(file_key).sign(parts)


def checks(key: bytes, name: str, data: memoryview) -> bool:
    """Whether ``data``, the bytes of file ``name``, ends with their check."""
    end = data.nbytes - CHECK_SIZE
    if end < 0:
        return False
    return hmac.compare_digest(file_check(key, name, [data[:end]]), data[end:])


def meta_fields(meta: Any, path: str) -> tuple[str, float, float | None]:
    """``(name, keep, expires)`` a spool's ``meta`` holds; raises ValueError unless
    they are a text and finite times (anything of the node's user can write it: a
    NaN expiry is a timer no event loop can order). The name is escaped and cut
    (it is logged); a time to keep over `MAX_KEEP` is cut to it."""
    if not isinstance(meta, dict):
        raise ValueError("not a map")
    name, keep, expires = meta["name"], meta["keep"], meta["expires"]
    if not isinstance(name, str):
        raise ValueError("its name is not a text")
    for what, value in (("keep", keep), ("expires", expires)):
        if value is None and what == "expires":
            continue
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"its {what} is {value!r}: not a time")
    keep = min(float(keep), MAX_KEEP)
    if expires is not None:
        expires = min(float(expires), time.time() + MAX_KEEP)
    return peer_text(name) or os.path.basename(path), keep, expires


#: Results up to this size are read into memory to be checked and sent; larger
#: ones are copied to a file of the node's own first (`private_copy`).
_READ_BYTES = 1 << 20
#: Most bytes copied with one call where the kernel cannot copy between the files.
_COPY_STEP = 1 << 20
#: Most bytes copied to memory (a memfd) where the disk has no room for the copy,
#: or no file system here makes files without a name: a larger one is left kept (a
#: node is not to take gigabytes of its machine's memory for one result, as many
#: times as clients recover it at once).
MEMORY_COPY = 64 << 20


class CopyRefused(OSError):
    """A kept result cannot be copied to be checked here, and will not be until
    the node's operator gives it a file system that makes files without a name:
    it stays kept (`private_copy`)."""


def private_copy(fd: int, size: int, directory: str) -> mmap.mmap | bytearray:
    """The ``size`` bytes of file ``fd`` in a copy only this process reaches: in
    its memory, or (over 1 MiB) a file with no name in ``directory`` (or, on a file
    system that makes none, NFS, in the node's temporary directory; in memory, a
    memfd, where there is no room or none can be made, for `MEMORY_COPY` bytes at
    most) mapped read-only.

    The node's jobs can change the spooled file, or cut it short, at any time: a
    result checked, then sent from a map of its file, was sent as a job rewrote it
    meanwhile (its bytes reached the client past the check), and a job that cut the
    file short as the node read the map killed the node (SIGBUS): never a map of a
    file the jobs can reach. Raises OSError (`CopyRefused` for a result over
    `MEMORY_COPY` where no file system here makes files without a name: said once
    in the log too); ValueError if the file is cut short as it is copied."""
    if size <= _READ_BYTES:
        data = bytearray(size)
        if os.preadv(fd, [data], 0) != size:
            raise ValueError("the file was cut short as it was read")
        return data
    refused: OSError | None = None
    for where in dict.fromkeys((directory, tempfile.gettempdir())):
        try:
            return _mapped_copy(fd, size, os.open(where, _UNNAMED, 0o600))
        except OSError as exc:
            if exc.errno not in _NO_UNNAMED_FILE:
                raise
            refused = exc
    assert refused is not None
    if size > MEMORY_COPY:
        if refused.errno in (errno.ENOSPC, errno.EDQUOT):
            raise refused  # for now: the result stays kept (`spool.KeptUnavailable`)
        # No file system here makes files without a name (a map of the file itself
        # let a job kill the node), and a copy in memory of any size let clients
        # recovering it at once take the machine's memory: kept, and said.
        why = (
            f"neither the file system of {directory} nor the temporary directory "
            f"{tempfile.gettempdir()} makes files without a name (NFS?), so the node "
            f"would copy a kept result of {size >> 20} MiB to memory to check it; it "
            f"copies {MEMORY_COPY >> 20} MiB at most"
        )
        global _UNNAMED_WARNED
        if not _UNNAMED_WARNED:
            _UNNAMED_WARNED = True
            logger.warning(
                "%s: such results stay kept until the node is restarted with "
                "TMPDIR on a local file system (ext4, xfs, btrfs, tmpfs) and the "
                "same --dest-path (where they are kept)",
                why,
            )
        raise CopyRefused(refused.errno, why)
    return _mapped_copy(fd, size, os.memfd_create("dispynb-kept", os.MFD_CLOEXEC))


_UNNAMED_WARNED = False


_UNNAMED = os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
#: Why no file with no name can be had there (or hold the copy): then memory.
_NO_UNNAMED_FILE = frozenset(
    {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSPC, errno.EDQUOT}
)


def _mapped_copy(fd: int, size: int, copy: int) -> mmap.mmap:
    """``size`` bytes of ``fd`` copied to ``copy`` (closed here), mapped."""
    try:
        done = 0
        while done < size:
            try:
                step = os.copy_file_range(fd, copy, size - done, done, done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS):
                    raise
                data = os.pread(fd, min(_COPY_STEP, size - done), done)
                step = os.pwrite(copy, data, done) if data else 0
            if step == 0:
                raise ValueError("the file was cut short as it was copied")
            done += step
        return mmap.mmap(copy, size, access=mmap.ACCESS_READ)
    finally:
        os.close(copy)
