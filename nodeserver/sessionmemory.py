"""`SessionMemory`: the shared memory of one client session's jobs and results.

A job's arguments may reach the node in shared memory (`dispynb.protocol.shm`), and
a worker may write a large result to shared memory for its client to read. The
session remembers the arguments until their jobs are reported back, and unlinks what
is left when it ends (with the results sent that its client never read: see
`nodeserver.resultobjects`), so a client killed with SIGKILL leaves nothing behind.
"""

from __future__ import annotations

from typing import Any

from dispynb.errors import SerializationError
from dispynb.protocol import shm
from nodeserver.computation import Computation, NodeJob


class SessionMemory:
    """Shared memory segments of one session (see the module docstring)."""

    def __init__(self) -> None:
        # comp_id -> (key, attempt) -> name of the job's arguments.
        self._jobs: dict[int, dict[tuple[int, int], str]] = {}

    def track_job(self, comp_id: int, job: NodeJob) -> None:
        """Remember a job's shared memory, to unlink it if the job never runs."""
        try:
            name = shm.reference_name(job.buffers[0])
        except SerializationError:
            return  # the worker refuses it and the job reports why
        self._jobs.setdefault(comp_id, {})[job.key, job.attempt] = name

    def reported(self, comp_id: int, entry: list[Any]) -> None:
        """A job's result is on its way: its arguments are the client's again."""
        if self._jobs and (segments := self._jobs.get(comp_id)) is not None:
            # The client reuses the object for another job: not ours to unlink.
            segments.pop((entry[0], entry[1]), None)

    def release(self, closed: list[Computation], adopted: list[Computation]) -> None:
        """The session ended: unlink what nobody will read. ``closed`` are its
        computations now closed (they unlinked what their workers did not send);
        ``adopted`` those the keeper took (their jobs still need their
        arguments)."""
        for computation in (*closed, *adopted):
            # Results sent that the client never read (killed first); kept
            # results hold copies (Kept.record).
            computation.result_objects.client_gone()
        kept = {computation.comp_id for computation in adopted}
        for comp_id, segments in self._jobs.items():
            if comp_id not in kept:
                for name in segments.values():
                    shm.unlink(name)
        if self._jobs and not adopted:  # a killed client leaves its pool
            shm.sweep()
        self._jobs.clear()
