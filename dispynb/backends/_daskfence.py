"""A Dask scheduler plugin that stops a lost job from running again.

When a worker dies, Dask's scheduler sends the tasks it was running to other workers
(up to ``distributed.scheduler.allowed-failures`` times). dispy's contract is
different: a job that is not ``reentrant`` is abandoned when its node is lost, and a
reentrant one runs at most ``max_attempts`` times. `Fence` enforces that on the
scheduler itself, in the same event-loop turn in which the scheduler reschedules the
task, so that the job never starts again: it counts, per dispynb task, the workers
lost while it was processing there, and cancels (``stimulus_cancel``) the tasks that
reached their limit.

This module is shipped to the scheduler by value (``cloudpickle``), so the scheduler
needs no dispynb: it imports only ``distributed``.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin


class Fence(SchedulerPlugin):
    """Cancel a cluster's tasks once ``limit`` of their workers died under them."""

    def __init__(self, prefix: str, limit: int, client_id: str) -> None:
        self.prefix = prefix
        self.limit = limit
        self.client_id = client_id
        self.where: dict[str, str] = {}
        self.lost: dict[str, int] = {}
        self.due: list[str] = []
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, **kw: Any
    ) -> None:
        if not (isinstance(key, str) and key.startswith(self.prefix)):
            return
        if finish == "processing":
            task = self.scheduler.tasks.get(key)
            worker = getattr(task, "processing_on", None)
            if worker is not None:
                self.where[key] = worker.address
        elif start == "processing":
            worker = self.where.pop(key, None)
            gone = worker is not None and worker not in self.scheduler.workers
            if finish == "released" and gone:
                count = self.lost[key] = self.lost.get(key, 0) + 1
                if count >= self.limit:
                    self.due.append(key)
        if finish in ("memory", "erred", "forgotten"):
            self.lost.pop(key, None)

    def remove_worker(self, scheduler: Any, worker: str, **kw: Any) -> None:
        if not self.due:
            return
        keys, self.due = self.due, []
        for key in keys:
            self.lost.pop(key, None)
        scheduler.stimulus_cancel(
            keys,
            self.client_id,
            force=True,
            reason="dispynb-lost",
            msg=f"worker {worker} was lost while the job ran",
        )
