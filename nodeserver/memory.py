"""Keep freed memory for reuse in node processes while they work, and give it back
once they are idle (glibc's malloc tunables and ``malloc_trim``).

Messages of megabytes are allocated and freed all the time on a node. By default
glibc serves such blocks with fresh ``mmap`` calls and hands freed heap memory back to
the kernel, so every message pays for page faults on new memory: on virtual machines
that costs more than the copy itself (the bandwidth benchmark doubled with this).
The price is that a process keeps what it freed: a worker that unpickled a 10 MB
argument held 10 MB more until its next job. `release_freed_memory` returns it; a
worker calls it once it has been idle for a moment after a job that may have used
much memory (`nodeserver.jobrunner.worker_loop`).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap, where freed memory is reused
#: (glibc's maximum on 64-bit systems).
MMAP_THRESHOLD = 32 * 1024 * 1024

#: Free memory kept at the top of the heap before it is given back to the kernel.
TRIM_THRESHOLD = 256 * 1024 * 1024

#: ``malloc_trim`` once looked up (a list so that no ``global`` is needed): empty
#: before the first call, ``[None]`` where there is none.
_trim: list[Callable[[int], int] | None] = []


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for reuse of large blocks; False where it is not glibc."""
    # The symbols the process already has (libc among them): no library search,
    # which would run ``ldconfig -p`` in a subprocess at every node process start.
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok: bool = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        logger.debug("mallopt refused the memory tunables")
    return ok


def release_freed_memory() -> bool:
    """Give the memory glibc's malloc keeps free back to the kernel (``malloc_trim``:
    the top of the heap and every free page inside it); False where it is not glibc.

    It takes some microseconds per megabyte held, so call it when idle, not per job.
    """
    if not _trim:
        try:
            function = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS)
            _trim.append(None)
        else:
            function.argtypes = [ctypes.c_size_t]
            function.restype = ctypes.c_int
            _trim.append(function)
    trim = _trim[0]
    if trim is None:
        return False
    trim(0)
    return True
