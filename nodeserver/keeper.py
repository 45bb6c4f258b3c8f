"""`ResultKeeper`: computations whose client may crash, kept for its recovery.

A client that keeps a recovery journal gives each computation a random recovery id.
If its connection is lost, the node does not kill that computation: its jobs go on,
their results are kept for ``keep`` seconds, and a client that presents the recovery id
on an authenticated connection (``dispynb.recover_jobs``) gets them.

Results are kept on disk (`nodeserver.spool`), not in memory, so a large backlog costs
no memory and survives a restart of the node: a node that starts again offers the
results its previous process kept, until they expire. Jobs still running when a node
stops are lost with it. How one kept computation holds its results (in memory until
its client acknowledges them, in the spool, or in memory for want of one) is
`nodeserver.keptresults`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from dispynb.wording import counted
from nodeserver.computation import Computation
from nodeserver.keptresults import (
    FILE,
    Deliver,
    Kept,
    KeptResult,
    PendingBudget,
    memory_cap,
)
from nodeserver.spool import ResultSpool

logger = logging.getLogger(__name__)


class ResultKeeper:
    """Recoverable computations of this node and their results, by recovery id.

    Every result of such a computation is recorded (whether or not it reached the
    client, which may have died before it wrote the result to its journal), for
    ``keep`` seconds after the computation ends, unless the client closes it cleanly
    or collects the results (`release`).

    Parameters
    ----------
    spool:
        Where results are kept; None keeps them in memory (tests).
    """

    def __init__(self, spool: ResultSpool | None = None) -> None:
        self._spool = spool
        self._kept: dict[str, Kept] = {}  # by spool key (a digest of the id)
        self._tasks: set[asyncio.Task[None]] = set()
        self._budget = PendingBudget()

    def _key(self, recovery_id: str) -> str:
        return ResultSpool.key(recovery_id)

    def load(self) -> int:
        """Offer the results kept by an earlier process of this node; return how many
        computations there were."""
        if self._spool is None:
            return 0
        for key, spool in self._spool.load().items():
            kept = Kept(None, spool, self._spool)
            kept.finished.set()
            self._kept[key] = kept
            expires = spool.expires or time.time() + spool.keep
            if spool.expires is None:  # its node was killed while it ran
                spool.expires = expires
                spool.cut_short = True
                self._spool.write_meta(spool)
            left = max(expires - time.time(), 0.0)
            self._spawn(self._expire(key, kept, left))
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
            if spool.files:
                what = (
                    f"{counted(len(spool.files), 'kept result')} offered to its client"
                )
            else:
                # Nothing to offer, but what its client's recover_jobs hears: its
                # jobs were lost with the node, not "never reached" it.
                what = "no result kept; its client's recover_jobs is told"
            logger.info(
                "computation %s%s: %s until %s (%.0f s from now), then removed",
                spool.name,
                " (its node was killed while it ran)" if spool.cut_short else "",
                what,
                until,
                left,
            )
        return len(self._kept)

    def kept(self, recovery_id: str) -> Kept | None:
        """The kept computation of ``recovery_id``, if any."""
        return self._kept.get(self._key(recovery_id))

    def register(self, recovery_id: str, computation: Computation) -> Kept:
        """A recoverable computation starts."""
        replaced = self._kept.get(self._key(recovery_id))
        if replaced is not None:  # the same id again: the first is not recoverable
            replaced.forget()
            self._end_replaced(replaced)
        kept = Kept(computation, budget=self._budget, name=computation.name)
        if self._spool is None:
            kept.no_spool = (
                "the node has no spool for them: it found none it could claim in "
                "its --dest-path (another node holds it, said as it started); give "
                "each node a --dest-path of its own it can write to"
            )
        else:
            kept.memory_cap = memory_cap(self._spool.max_bytes)
            try:
                kept.spool = self._spool.create(recovery_id, computation.name)
                kept.owner = self._spool
            except OSError as exc:
                logger.warning(
                    "cannot spool results of %s (%s): kept in memory",
                    computation.name,
                    exc,
                )
                kept.no_spool = (
                    f"its spool could not be made: {exc}; free space in the node's "
                    "--dest-path, or let the node write there"
                )
        self._kept[self._key(recovery_id)] = kept
        return kept

    def journaled(self, recovery_id: str, jobs: list[tuple[Any, Any]]) -> None:
        """Its client has these results (``(key, attempt)``) in its journal: they
        are no longer kept (a pending one is dropped, a spooled one removed)."""
        kept = self._kept.get(self._key(recovery_id))
        if kept is not None:
            kept.journaled(jobs)

    def adopt(
        self, recovery_id: str, keep: float, computation: Computation | None = None
    ) -> bool:
        """Its client's connection is lost: let the jobs finish, keep the results
        (those it had not acknowledged as journaled too).

        False if ``recovery_id`` is kept for another computation than
        ``computation``: its client came back on a new connection before the node
        saw this one end, and set it up again there; this one is for nobody."""
        key = self._key(recovery_id)
        kept = self._kept.get(key)
        if (
            computation is not None
            and kept is not None
            and kept.computation is not computation
        ):
            return False
        if kept is None or kept.computation is None:
            return True
        kept.write_pending()
        logger.info(
            "client of computation %s gone: its jobs go on, results kept %.0f s",
            kept.computation.name,
            keep,
        )
        if kept.spool is not None and kept.owner is not None:
            kept.spool.keep = keep
            kept.owner.write_meta(kept.spool)
        kept.adopted = True
        kept.finisher = self._spawn(self._finish(key, kept, keep))
        return True

    def _end_replaced(self, kept: Kept) -> None:
        """Its client set the computation up again on a new connection: it gave up
        on the jobs it left here when it lost this node (they ended Abandoned, or
        run elsewhere). If adopted, those would run on for nobody (queued ones
        would even start): they are terminated. (Not adopted yet, its session
        closes it when it ends: see `adopt`.)"""
        computation, finisher = kept.computation, kept.finisher
        if not kept.adopted or computation is None:
            return
        kept.computation = None
        logger.info(
            "computation %s: its client set it up again: the jobs it left are "
            "terminated",
            computation.name,
        )
        if finisher is not None:
            # It stops waiting for them (a shutdown of the process already under
            # way runs to its end, and the close below waits for it).
            finisher.cancel()

        async def terminate() -> None:
            if finisher is not None:
                await asyncio.wait({finisher})
            await computation.close(terminate=True)

        self._spawn(terminate())

    async def _finish(self, key: str, kept: Kept, keep: float) -> None:
        assert kept.computation is not None
        try:
            await asyncio.wait_for(kept.computation.close(terminate=False), keep)
        except TimeoutError:
            logger.info(
                "computation %s: its client did not come back in %.0f s: the jobs "
                "still running are terminated (their results could not be kept)",
                kept.computation.name,
                keep,
            )
            await kept.computation.close(terminate=True)
        kept.finished.set()
        # Its jobs are over: what is kept is its results. The computation holds its
        # client's ended session (connection, outbox, tasks' frames): freed now,
        # not when the results expire (an hour by default).
        kept.computation = None
        if kept.spool is not None and kept.owner is not None:
            kept.spool.expires = time.time() + keep
            kept.owner.write_meta(kept.spool)
        await self._expire(key, kept, keep)

    async def _expire(self, key: str, kept: Kept, after: float) -> None:
        await asyncio.sleep(after)
        if self._kept.get(key) is kept:
            self._drop(key)
            name = kept.spool.name if kept.spool else "?"
            logger.info("results of computation %s dropped (expired)", name)

    def claim(
        self, recovery_id: str, deliver: Deliver
    ) -> tuple[Kept, list[KeptResult]] | None:
        """The kept computation and every result recorded so far (spooled ones are
        read only when `Kept.open` is called: none is in memory); results recorded
        from now on go to ``deliver``."""
        kept = self._kept.get(self._key(recovery_id))
        if kept is None:
            return None
        if kept.spool is not None and kept.spool.key is None and kept.owner:
            # Left by an earlier process: its files are checked with the id now.
            kept.owner.check_names(kept.spool, recovery_id)
        kept.write_pending()
        recorded = list(kept.results) + kept.not_kept.results()
        recorded += kept.provisional.values()  # of jobs still running
        if kept.spool is not None:
            recorded[:0] = [KeptResult(path) for path, _size in kept.spool.files]
        kept.deliver = deliver
        return kept, recorded

    def release(self, recovery_id: str) -> None:
        """Its client closed it, or collected its results: forget them."""
        self._drop(self._key(recovery_id))

    def _drop(self, key: str) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            kept.forget()
        if kept is not None and kept.spool is not None and kept.owner is not None:
            kept.owner.remove(kept.spool)

    @property
    def running(self) -> bool:
        """Whether a computation whose client is gone may still run jobs."""
        return any(k.adopted and not k.finished.is_set() for k in self._kept.values())

    async def drain(self) -> None:
        """Wait until the jobs of computations whose client is gone have ended (the
        node drains; the others are its sessions' to wait for)."""
        await asyncio.gather(
            *(k.finished.wait() for k in list(self._kept.values()) if k.adopted)
        )

    async def close(self) -> None:
        """Node shutdown: stop the kept computations; spooled results stay on disk
        (a restarted node offers them until they expire)."""
        for task in self._tasks:
            task.cancel()
        kept, self._kept = list(self._kept.values()), {}
        now = time.time()
        for entry in kept:
            entry.write_pending()  # its client may be connected still
            spool, owner = entry.spool, entry.owner
            if spool is not None and owner is not None and spool.expires is None:
                spool.expires = now + spool.keep
                owner.write_meta(spool)
        await asyncio.gather(
            *(k.computation.close(terminate=True) for k in kept if k.computation),
            return_exceptions=True,
        )
        for entry in kept:  # with the ends of the jobs just terminated
            if entry.spool is not None:
                ResultSpool.report_failures(entry.spool, "the node stops")
            _report_lost_from_memory(entry)
        if self._spool is not None:  # what was written since the last flush
            await asyncio.to_thread(self._spool.sync)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _report_lost_from_memory(kept: Kept) -> None:
    """Log what ``kept`` held in memory for its client's recovery (the disk refused
    it, or the node has no spool): the node stops, so it is lost. The line about
    the results the disk refused only counted them, as if they were safe; it named
    a computation gone with its jobs "?", and advised on the disk whatever the
    cause."""
    if kept.dropped or not kept.results:
        return
    files = sum(1 for r in kept.results if r.entry and r.entry[0] == FILE)
    what = counted(len(kept.results) - files, "result")
    if files:
        what += f" and {counted(files, 'file')} its jobs sent"
    if kept.spool is None or kept.owner is None:
        why = kept.no_spool or "the node has no spool for them"
    else:
        why = (
            f"its disk refused them: {kept.spool.failure or 'see above'}; "
            f"{kept.spool.remedy or 'see above'}"
        )
    logger.warning(
        "computation %s: %s held in memory for its client's recover_jobs %s lost "
        "as the node stops (%s)",
        kept.name or (kept.spool.name if kept.spool is not None else "unnamed"),
        what,
        "is" if len(kept.results) == 1 else "are",
        why,
    )
