"""How many jobs sent on one connection still need each of their own files.

A job's own files (its ``depends``) are sent to a node before the job, once per
connection; the node lets go of one (``FileRelease``) once no job sent on that
connection needs it any more, so a long computation's per-job files neither pile up
on the node nor count in its transfer quota for ever. The client's links to nodes
and the shared scheduler's keep this count alike; no I/O here.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable


class FileUses:
    """Digest -> number of unfinished jobs on one connection that need the file."""

    __slots__ = ("_uses",)

    def __init__(self) -> None:
        self._uses: collections.Counter[str] = collections.Counter()

    def need(self, digests: Iterable[str]) -> None:
        """A job sent on the connection needs these files until it ends."""
        self._uses.update(digests)

    def done(self, digests: Iterable[str]) -> list[str]:
        """Jobs that needed these files ended: return those no job needs now (for
        the node to let go; they are sent again before a later job needs them)."""
        uses = self._uses
        released = []
        for digest in digests:
            left = uses[digest] - 1
            if left > 0:
                uses[digest] = left
            else:
                del uses[digest]
                released.append(digest)
        return released

    def __contains__(self, digest: object) -> bool:
        return digest in self._uses

    def __len__(self) -> int:
        return len(self._uses)


__all__ = ["FileUses"]
