"""Why a job on this node ended without its result, in words that say what to
change: its time limit, its memory limit, how its worker process died."""

from __future__ import annotations

# The same on the engines (Dask, Ray), and the client's (`dispynb.job`):
from dispynb.jobenv import TERMINATED_AT_REQUEST as TERMINATED_AT_REQUEST
from dispynb.jobenv import crash_reason as crash_reason
from dispynb.jobenv import mem_limit_note as mem_limit_note
from dispynb.jobenv import signal_name as signal_name
from dispynb.jobenv import timeout_reason as timeout_reason


def channel_reason(error: str) -> str:
    """Why a job failed whose worker sent the node something it cannot read
    (``error``: what was wrong): the worker was killed for it."""
    return (
        f"the job's worker process sent its node what is not a message ({error}): "
        "the job (or a library it uses) wrote to the worker's own channel to the "
        "node, a descriptor it inherited; the worker was killed"
    )


#: Exit status of a worker whose channel to the node was closed under it: its job
#: closed (or replaced) that descriptor, which it did not open.
CHANNEL_LOST_STATUS = 117


def channel_lost_reason() -> str:
    """Why a job failed whose worker lost its channel to the node (it exited with
    `CHANNEL_LOST_STATUS`)."""
    return (
        "the job closed its worker's channel to the node, a descriptor it did not "
        "open (os.closerange(3, ...), a daemon's habits? close only what the job "
        "opened): its worker could not send the result, and exited"
    )


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed since boot
    (``oom_kill`` of /proc/vmstat, Linux 4.13+; a memory cgroup's kills count
    too), or None where that is not known."""
    try:
        with open("/proc/vmstat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    start = data.find(b"\noom_kill ")
    if start < 0:
        return None
    return int(data[start + 10 : data.index(b"\n", start + 1)])


def oom_note(peak_bytes: int) -> str:
    """Appended to the crash reason of a worker killed by SIGKILL while the kernel's
    out-of-memory killer was at work (the system's or its memory cgroup's)."""
    return (
        "; the kernel's out-of-memory killer was at work meanwhile: the job probably "
        f"ran out of memory (its worker's peak resident memory: {peak_bytes >> 20} "
        "MiB); give the node more memory or the job less data, or a mem_limit to get "
        "MemoryError instead"
    )
