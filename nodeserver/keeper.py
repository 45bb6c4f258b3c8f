"""`ResultKeeper`: computations whose client may crash, kept for its recovery.

A client that keeps a recovery journal gives each computation a random recovery id.
If its connection is lost, the node does not kill that computation: its jobs go on,
their results are kept (in memory) for ``keep`` seconds, and a client that presents the
recovery id on an authenticated connection (``dispynb.recover_jobs``) gets them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodeserver.computation import Computation

logger = logging.getLogger(__name__)

#: ``deliver(entry, buffers)``: hand one kept result to the recovering client.
Deliver = Callable[[list[Any], list[memoryview]], None]


@dataclass(eq=False)
class Kept:
    """One kept computation and its undelivered results."""

    computation: Computation
    results: list[tuple[list[Any], list[memoryview]]] = field(default_factory=list)
    deliver: Deliver | None = None  # a recovering client's session
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class ResultKeeper:
    """Recoverable computations of this node and their results, by recovery id.

    Every result of such a computation is recorded (whether or not it reached the
    client, which may have died before it wrote the result to its journal), for
    ``keep`` seconds after the computation ends, unless the client closes it cleanly.
    """

    def __init__(self) -> None:
        self._kept: dict[str, Kept] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, recovery_id: str, computation: Computation) -> Kept:
        """A recoverable computation starts."""
        kept = self._kept[recovery_id] = Kept(computation)
        return kept

    @staticmethod
    def record(kept: Kept, entry: list[Any], buffers: list[memoryview]) -> None:
        """One of its results (also sent to the client, if connected)."""
        kept.results.append((entry, buffers))
        if kept.deliver is not None:
            kept.deliver(entry, buffers)

    def adopt(self, recovery_id: str, keep: float) -> None:
        """Its client's connection is lost: let the jobs finish, keep the results."""
        kept = self._kept.get(recovery_id)
        if kept is None:
            return
        logger.info(
            "client of computation %s gone: its jobs go on, results kept %.0f s",
            kept.computation.name,
            keep,
        )
        task = asyncio.get_running_loop().create_task(self._finish(recovery_id, keep))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, recovery_id: str, keep: float) -> None:
        kept = self._kept[recovery_id]
        try:
            await asyncio.wait_for(kept.computation.close(terminate=False), keep)
        except TimeoutError:
            await kept.computation.close(terminate=True)
        kept.finished.set()
        await asyncio.sleep(keep)
        if self._kept.get(recovery_id) is kept:
            del self._kept[recovery_id]
            logger.info("results of computation %s dropped", kept.computation.name)

    def claim(self, recovery_id: str, deliver: Deliver) -> Kept | None:
        """Hand every recorded result to ``deliver``; route later ones to it too."""
        kept = self._kept.get(recovery_id)
        if kept is None:
            return None
        for entry, buffers in kept.results:
            deliver(entry, buffers)
        kept.deliver = deliver
        return kept

    def release(self, recovery_id: str) -> None:
        """Its client closed it, or recovered everything: forget it."""
        self._kept.pop(recovery_id, None)

    async def close(self) -> None:
        """Node shutdown: stop the kept computations too."""
        for task in self._tasks:
            task.cancel()
        kept, self._kept = list(self._kept.values()), {}
        await asyncio.gather(
            *(k.computation.close(terminate=True) for k in kept), return_exceptions=True
        )
