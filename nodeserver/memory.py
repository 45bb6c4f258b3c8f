"""Keep freed memory for reuse in node processes (glibc's malloc tunables).

Messages of megabytes are allocated and freed all the time on a node. By default
glibc serves such blocks with fresh ``mmap`` calls and hands freed heap memory back to
the kernel, so every message pays for page faults on new memory: on virtual machines
that costs more than the copy itself (the bandwidth benchmark doubled with this).
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap, where freed memory is reused
#: (glibc's maximum on 64-bit systems).
MMAP_THRESHOLD = 32 * 1024 * 1024

#: Free memory kept at the top of the heap before it is given back to the kernel.
TRIM_THRESHOLD = 256 * 1024 * 1024


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
