"""A Dask scheduler plugin that stops a lost job from running again.

When a worker dies, Dask's scheduler sends the tasks it was running to other workers
(up to ``distributed.scheduler.allowed-failures`` times). dispy's contract is
different: a job that is not ``reentrant`` is abandoned when its node is lost, and a
reentrant one runs at most ``max_attempts`` times. `Fence` enforces that on the
scheduler itself, in the same event-loop turn in which the scheduler reschedules the
task, so that the job never starts again: it counts, per dispynb task, the workers
lost while it was processing there, and cancels (``stimulus_cancel``) the tasks that
reached their limit.

It also keeps the scheduler from holding on to what the cluster's jobs send its
client: their provisional results and files (up to 32 MiB each) travel as events on
the client's topic, which the scheduler stores (the last 1000 per topic, for an hour
after the client left) besides sending them on. `Fence.log_event` drops them from
that store as soon as they are sent.

This module is shipped to the scheduler by value (``cloudpickle``), so the scheduler
needs no dispynb: it imports only ``distributed``.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin


class Fence(SchedulerPlugin):
    """Cancel a cluster's tasks once ``limit`` of their workers died under them;
    keep no event of the cluster's client on the scheduler."""

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

    def log_event(self, topic: str, msg: Any) -> None:
        """An event was logged and sent to the subscribers: one on this client's
        topic (a job's provisional result or file, a worker's state) is forgotten,
        never to be asked again (the client subscribed before its first)."""
        if topic == self.client_id and self.scheduler is not None:
            broker = getattr(self.scheduler, "_broker", None)
            if broker is not None:  # else an older distributed: kept as before
                broker.truncate(topic)

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
