"""A hint at `JobCluster.put` for a large argument that `submit` sends again and
again (each job pickles and sends its own copy; ``put`` sends it once a node).

Cheap by design, as it runs for every job: only the top-level arguments are
looked at, their size is what they say (``len`` of bytes, ``nbytes`` of a NumPy
array or pandas Series), and "the same" is identity, held by a weak reference
(so an object that cannot have one, ``bytes`` for one, is not followed). Nothing
is hashed or pickled here.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["HINT_AFTER", "LARGE", "RepeatedArguments"]

#: Bytes from which an argument counts as large.
LARGE = 8 * 2**20

#: Jobs sent the same large argument before the hint is given.
HINT_AFTER = 3

#: Large arguments followed at most (more distinct ones: the count starts over).
FOLLOWED = 16

#: Types of the usual small arguments, passed over at once (a missing attribute's
#: lookup costs some 0.3 us an argument, on every job).
_SMALL = frozenset({int, float, str, bool, type(None), complex, tuple, list, dict})


def _size(value: Any) -> int:
    """What ``value`` says its size is, in bytes (0: it does not say)."""
    if isinstance(value, bytes | bytearray):
        return len(value)
    nbytes = getattr(type(value), "nbytes", None)  # not a __getattr__'s answer
    if nbytes is None:
        return 0
    size = getattr(value, "nbytes", 0)
    return size if isinstance(size, int) else 0


class RepeatedArguments:
    """Counts the jobs each large argument (by identity) went with; `note` says
    when to give the hint, once."""

    def __init__(self) -> None:
        self._counts: dict[int, tuple[weakref.ref[Any], int]] = {}
        self.hinted = False

    def note(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Count a job's arguments; the hint, the first time one large argument
        went with `HINT_AFTER` jobs, else None."""
        if self.hinted:
            return None
        for value in (*args, *kwargs.values()):
            if type(value) in _SMALL:
                continue
            size = _size(value)
            if size < LARGE:
                continue
            seen = self._counts.get(id(value))
            if seen is not None and seen[0]() is value:
                count = seen[1] + 1
                ref = seen[0]
            else:
                try:
                    ref = weakref.ref(value)
                except TypeError:
                    continue
                count = 1
                if len(self._counts) >= FOLLOWED:
                    self._counts.clear()
            self._counts[id(value)] = (ref, count)
            if count >= HINT_AFTER:
                self.hinted = True
                self._counts.clear()
                what = f"{type(value).__name__} of {size / 2**20:.0f} MiB"
                return (
                    f"the same {what} went with {count} jobs: submit pickles and "
                    "sends it again with each job. "
                    "Send it once: ref = cluster.put(value), then submit(ref, ...) "
                    "(each node gets it once; docs/howto/shared-objects.md). Said once"
                )
        return None
