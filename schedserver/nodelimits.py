"""What a node takes, checked by the scheduler before it sends it there.

A node refuses a message larger than its ``--max-message-size`` (its `Welcome`
says how large) by ending the connection, and a setup whose file entries are not
as it wants them by failing it; the scheduler sends each computation's setup,
and its files, to every node. So what one user sends once (a setup of 80 MB, a
file of 100 MB, an entry holding 16 MiB of nested lists) was pushed to each node,
which dropped it, or decoded it into 1 GiB of objects, and the client heard of a
lost connection. The scheduler refuses a setup's malformed entries at once
(`malformed_file_entry`) and does not send a node what is over its limit
(`setup_over_node`, `file_over_node`), saying why in words that name the option.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dispynb.errors import ProtocolError
from dispynb.protocol.auth import MAC_SIZE
from dispynb.protocol.files import safe_relative_path
from dispynb.protocol.messages import ComputationSetup, pack_header

#: A file's digest as nodes store it (SHA-256, lowercase hex).
_DIGEST = re.compile(r"[0-9a-f]{64}")

#: Bytes a message carrying one file (`FilePut`) takes besides the file: its
#: header (the digest, the size), the buffers' lengths and the MAC.
FILE_ROOM = 512


def malformed_file_entry(entry: Any) -> str:
    """Why a file entry of a computation's setup is refused ("" if it is not):
    ``[path, digest, size]``, and ``True`` fourth for a program, as a node takes
    it. A node refused anything else only once it had decoded it: an entry
    holding 16 MiB of nested lists took 1 GiB of each node's memory, and the
    scheduler's while the computation lived."""
    if not (
        isinstance(entry, list)
        and len(entry) in (3, 4)
        and isinstance(entry[0], str)
        and isinstance(entry[1], str)
        and type(entry[2]) is int
        and entry[2] >= 0
        and entry[3:] in ([], [True])
    ):
        return (
            "malformed file entry in computation-setup: each is [path, digest, "
            "size], and True fourth for a program"
        )
    if not _DIGEST.fullmatch(entry[1]):
        return f"malformed file entry in computation-setup: bad digest {entry[1]!r:.80}"
    try:
        safe_relative_path(entry[0])
    except ProtocolError as exc:
        return f"malformed file entry in computation-setup: {exc!s:.300}"
    return ""


def message_size(header: bytes, buffers: Sequence[memoryview]) -> int:
    """Bytes of a message as the ``max_message_size`` of its receiver counts them
    (its frame after the prefix: lengths, header, buffers, MAC)."""
    lengths = 4 * (1 + len(buffers))
    return lengths + len(header) + sum(b.nbytes for b in buffers) + MAC_SIZE


def setup_over_node(
    setup: ComputationSetup, bundle: Sequence[memoryview], limit: int
) -> str:
    """Why a node taking messages of ``limit`` bytes at most is not sent ``setup``
    (as it goes there) and its ``bundle``, nor the files it lists ("" if it is;
    0: a limit not said)."""
    if not limit:
        return ""  # (not said)
    size = message_size(pack_header(setup.to_header()), bundle)
    if size > limit:
        listed = f", the {len(setup.files)} files listed" if setup.files else ""
        return (
            f"its setup is a message of {size} bytes (its functions, setup "
            f"arguments and depends{listed}), over the {limit} bytes this node "
            "takes (dispynb-node --max-message-size): send large data as files "
            "in depends, or have the node's limit raised"
        )
    largest = max(setup.files, key=lambda entry: entry[2], default=None)
    if largest is not None:
        return file_over_node(largest[0], largest[2], limit)
    return ""


def file_over_node(path: str, size: int, limit: int) -> str:
    """Why a node taking messages of ``limit`` bytes at most is not sent the file
    ``path`` of ``size`` bytes ("" if it is; 0: a limit not said)."""
    if not limit or size + FILE_ROOM <= limit:
        return ""
    return (
        f"file {path!r:.200} of {size} bytes is over the messages of {limit} bytes "
        "this node takes (dispynb-node --max-message-size): send it in smaller "
        "files, or have the node's limit raised"
    )
