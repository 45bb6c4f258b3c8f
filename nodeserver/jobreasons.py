"""Why a job on this node ended without its result, in words that say what to
change: its time limit, its memory limit, how its worker process died."""

from __future__ import annotations

import signal


def timeout_reason(timeout: float) -> str:
    """Why a job that ran over its time limit was terminated, and how to allow more."""
    return (
        f"the job ran over its time limit of {timeout:g} s (job_timeout / "
        "dispy_job_timeout) and was terminated; give a larger limit, e.g. "
        f"submit(..., dispy_job_timeout={max(timeout * 2, 1):g}), or None for none"
    )


def mem_limit_note(mem_limit: int) -> str:
    """Appended to the crash reason of a job that ran under a memory limit."""
    return (
        f"; it probably exceeded mem_limit of {mem_limit} bytes (mem_limit / "
        "dispy_job_mem_limit): give a larger limit, or None for none"
    )


def crash_reason(returncode: int) -> str:
    """Explain how a worker process ended, for the job that was running in it."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the job's worker process was killed by {name} ({-returncode})"
    return (
        f"the job's worker process exited with status {returncode} "
        "(os._exit() or a fatal error in an extension)"
    )
