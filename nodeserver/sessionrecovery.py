"""Results kept for a client that may come back: a computation set up with a
recovery id is adopted by the node's `ResultKeeper` when its client goes away, and a
client that reconnects (`Recover`) is sent what was kept for it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TYPE_CHECKING, Any

from dispynb.defaults import MAX_MESSAGE_SIZE, PRE_AUTH_MAX_FRAME
from dispynb.errors import DispynbError, KeptUnavailable, MessageError
from dispynb.protocol.messages import (
    KEPT_UNAVAILABLE,
    ComputationClosed,
    ComputationSetup,
    Error,
    JobResults,
    Recover,
    Recovered,
    ResultsJournaled,
)
from nodeserver.computation import Computation
from nodeserver.keptresults import Kept, KeptResult
from nodeserver.recovering import KeptResultSender
from nodeserver.sessionstate import HAND_BACK_TIMEOUT, _SessionState, logger

#: What a recovering client is told when a later recovery of the same results
#: (another connection) ends its own.
_SUPERSEDED = (
    "another connection recovers these results now (a later recover_jobs with the "
    "same recovery file): this one stops; they stay kept for that one"
)


class _SessionRecovery(_SessionState):
    """The session's part that keeps results for its client and sends them back
    (see the module docstring)."""

    if TYPE_CHECKING:  # `ClientSession`'s

        def _start_status_reports(self, interval: float | None) -> None: ...

    def _keep_results(
        self, message: ComputationSetup, computation: Computation
    ) -> None:
        """Record ``computation``'s results for its client's recovery id (if any)."""
        recovery_id = message.recovery_id
        if not recovery_id:
            return
        kept = self.server.keeper.register(recovery_id, computation)
        kinds = computation.result_kinds  # of the result being reported
        self._recovery[message.comp_id] = (recovery_id, message.keep_results)
        if not message.keep_sent:
            self._crash_only.add(message.comp_id)
        keep_sent = message.keep_sent
        kept.acked = keep_sent and message.ack_journaled

        def record(entry: list[Any], buffers: list[memoryview]) -> None:
            # With keep_sent every result, else only what ends once the client
            # is gone (nothing is written before).
            if keep_sent or kept.adopted:
                key = entry[0]
                kept.record(entry, buffers, kinds.get(key, ""))

        computation.also_report(record)

        def provisional(key: int, attempt: int, buffers: list[memoryview]) -> None:
            if keep_sent or kept.adopted:  # as results: its job may still run then
                kept.keep_provisional(key, attempt, buffers)

        def keep_file(key: int, path: str, buffers: list[memoryview]) -> str | None:
            # Its client is gone (or going): the file waits for it.
            return kept.keep_file(key, path, buffers)

        computation.also_keep(provisional, keep_file)

    def _acks_journaled(self, comp_id: int) -> bool:
        """Whether the node takes `ResultsJournaled` for this computation (it
        keeps its results, and its client asked to acknowledge them)."""
        recovery = self._recovery.get(comp_id)
        if recovery is None:
            return False
        kept = self.server.keeper.kept(recovery[0])
        return kept is not None and kept.acked

    def _on_journaled(
        self, message: ResultsJournaled, buffers: list[memoryview]
    ) -> None:
        """The client journaled these results: they need not be kept."""
        jobs = []
        for job in message.jobs:
            if not (isinstance(job, list) and len(job) == 2) or not all(
                isinstance(part, int) for part in job
            ):
                raise MessageError("malformed job in results-journaled")
            jobs.append((job[0], job[1]))
        recovery = self._recovery.get(message.comp_id)
        if recovery is not None:  # else closed, or not kept: nothing to drop
            self.server.keeper.journaled(recovery[0], jobs)

    def _recovers(self, comp_id: int) -> bool:
        """Whether the client comes back for this computation's jobs (not only
        after a crash)."""
        return comp_id in self._recovery and comp_id not in self._crash_only

    def _forget_results(self, comp_id: int) -> None:
        """The computation closed cleanly: nothing to keep."""
        recovery = self._recovery.pop(comp_id, None)
        if recovery is not None:
            self.server.keeper.release(recovery[0])

    def _keeper_adopts(self, comp_id: int, computation: Computation) -> bool:
        """The session ended: the keeper adopts ``computation`` if its client may
        come back for the results (True); else it is to be closed (False)."""
        if comp_id not in self._recovery or not self._keeper_takes(
            comp_id, computation
        ):
            return False
        computation.hold_workers(False)  # the keeper takes its results
        return True

    def _keeper_adopts_the_dead(self) -> None:
        """The session ended (after `_keeper_adopts`): the results recorded for
        computations whose process died meanwhile are kept ``keep`` seconds too, as
        those of a client gone; before, nothing dropped them while the node ran."""
        for comp_id in list(self._recovery):
            self._keeper_takes(comp_id)

    def _keeper_takes(
        self, comp_id: int, computation: Computation | None = None
    ) -> bool:
        """The keeper adopts the kept results of ``comp_id``, or, if it was kept
        only for a crash and its client went silent, drops them: False then, and
        False if its client set it up again on another connection meanwhile."""
        recovery = self._recovery.pop(comp_id)
        if self._orphaned and comp_id in self._crash_only:
            self.server.keeper.release(recovery[0])
            return False
        return self.server.keeper.adopt(*recovery, computation)

    def _end_claims(self) -> None:
        for claimed, deliver in self._claims:
            if claimed.deliver == deliver:  # (not a later recovery's)
                claimed.deliver = None  # a recovering client went away too

    def _on_recover(self, message: Recover, buffers: list[memoryview]) -> None:
        comp_id = message.comp_id
        # The client's message size limit (an older client's: the default); no
        # client takes less than a handshake's.
        limit = message.max_message_size or MAX_MESSAGE_SIZE
        limit = max(limit, PRE_AUTH_MAX_FRAME)
        sender = KeptResultSender(self.conn, comp_id, limit)
        if message.pulse_interval:  # its sign of life while jobs still run
            self._start_status_reports(message.pulse_interval)
        claimed = self.server.keeper.claim(message.recovery_id, sender.deliver)
        self.outbox.flush()
        if claimed is None:
            self.outbox.write(Recovered(comp_id=comp_id, found=False, running=False))
            return
        kept, recorded = claimed
        if kept.computation is not None:
            starts = kept.computation.starts()
            if starts:  # before its results: a job that ended since is not Running
                self.outbox.write(
                    JobResults(comp_id=comp_id, results=[], started=starts)
                )
            # Jobs that start from now on are told to this client (they were to
            # the session of the client that went, which nobody reads).
            kept.computation.on_start = self.outbox.starter(comp_id)
        self._claims.append((kept, sender.deliver))
        self._recovering[comp_id] = kept
        earlier = kept.sending
        sending = self._send_kept(
            sender, kept, recorded, message.recovery_id, earlier and earlier[0]
        )
        task = self._spawn(sending)
        kept.sending = (task, self.conn)
        task.add_done_callback(functools.partial(_sent, kept))

    def _close_recovered(self, comp_id: int, terminate: bool) -> bool:
        """The client closes a computation it recovers (``recover_jobs`` with
        ``terminate_pending``): with ``terminate``, its jobs still running are
        terminated; their ends reach the client as they come, then
        `ComputationClosed`. False if the client recovers no ``comp_id``."""
        kept = self._recovering.get(comp_id)
        if kept is None:
            return False
        computation = kept.computation
        if computation is None or kept.finished.is_set():
            self.outbox.write(ComputationClosed(comp_id=comp_id))  # none runs
        elif terminate:
            logger.info(
                "%s: the recovering client terminates its jobs", computation.name
            )
            computation.terminate_all()
        return True

    async def _send_kept(
        self,
        sender: KeptResultSender,
        kept: Kept,
        recorded: list[KeptResult],
        recovery_id: str,
        earlier: asyncio.Task[None] | None,
    ) -> None:
        """Send the kept results (one by one, under back-pressure) once the
        ``earlier`` recovery of them (if any) has ended; drop them once they all
        are on their way.

        One recovery of a computation's results at a time, the latest: each holds
        a copy of the result it sends (in memory, or a file with no name on the
        disk), and clients that recover it at once, never reading, made as many
        copies. The latest, for a client that comes back on a new connection
        while the node has not yet found its old one dead."""
        try:
            if earlier is not None and not earlier.done():
                earlier.cancel()
                await asyncio.wait([earlier])  # its copy let go (`_in_thread`)
            await self._send_all(sender, kept, recorded, recovery_id)
        except asyncio.CancelledError:
            if earlier is not None:  # (ended too before a later one starts)
                await asyncio.wait([earlier])
            sending = kept.sending
            if sending is None or sending[0] is asyncio.current_task():
                raise  # (not a later recovery's doing: the node stops)
            if sending[1] is not self.conn:  # (else its client asked again)
                logger.debug(
                    "%s: a later recovery of computation %s ends this one",
                    self.conn.peer,
                    kept.name,
                )
                await self._let_go(_SUPERSEDED)

    async def _send_all(
        self,
        sender: KeptResultSender,
        kept: Kept,
        recorded: list[KeptResult],
        recovery_id: str,
    ) -> None:
        try:
            await sender.run(kept, recorded)
        except KeptUnavailable as exc:
            await self._give_up_recovery(kept, str(exc), sender.unavailable_keys)
            return
        except DispynbError as exc:
            logger.info(
                "%s went away while recovering results: %s", self.conn.peer, exc
            )
            return  # not all sent: they stay kept for another try
        if kept.deliver == sender.deliver:  # (not a later client's)
            kept.deliver = None
        await self._release_when_sent(recovery_id)

    async def _give_up_recovery(self, kept: Kept, why: str, keys: list[int]) -> None:
        """The node cannot read some of ``kept``'s results now (it sent the
        others): its client is told why, and of which jobs (``keys``: its other
        jobs, still running here, are not concerned), and let go (its connection
        closed: an older client would wait for them until its timeout); they stay
        kept for its next ``recover_jobs``."""
        logger.warning(
            "%s: kept results of computation %s not sent: %s",
            self.conn.peer,
            kept.spool.name if kept.spool is not None else "?",
            why,
        )
        await self._let_go(why, keys)

    async def _let_go(self, why: str, keys: list[int] | None = None) -> None:
        """Tell the client why its recovery ends (for the jobs of ``keys``; None:
        all), and close its connection (what it did not read goes, the copy of a
        result with it)."""
        self.outbox.write(Error(code=KEPT_UNAVAILABLE, message=why, keys=keys))
        self.outbox.flush()
        with contextlib.suppress(DispynbError, TimeoutError):
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await self.conn.flush()
        self.conn.close()

    async def _release_when_sent(self, recovery_id: str) -> None:
        """Every kept result is collected: drop them once they are on their way."""
        self.outbox.flush()
        try:
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await self.conn.flush()
        except (DispynbError, TimeoutError):
            # A client that read everything may hang up before this task runs.
            if not self.conn.all_sent:
                return  # not sent: keep them for another try
        self.server.keeper.release(recovery_id)


def _sent(kept: Kept, task: asyncio.Task[None]) -> None:
    """A recovery of ``kept`` ended: it no longer holds its connection (and what it
    was given to send) for as long as the results are kept, an hour by default; a
    client gone mid-transfer left them all held."""
    if kept.sending is not None and kept.sending[0] is task:
        kept.sending = None
