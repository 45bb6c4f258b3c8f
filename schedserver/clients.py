"""The shared scheduler's clients: their sessions, the computations they set up,
what happens to those when a client goes away, and a client's recovery of them."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, cast

from dispynb.defaults import MAX_MESSAGE_SIZE, PRE_AUTH_MAX_FRAME
from dispynb.errors import DispynbError
from dispynb.protocol.handshake import HEALTH_PROBE
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationSetup,
    Error,
    JobResults,
    Recover,
    Recovered,
)
from dispynb.transport.connection import Connection
from dispynb.wording import counted
from schedserver.computation import SharedComputation
from schedserver.session import SchedulerSession
from schedserver.state import _ServerState, logger

if TYPE_CHECKING:
    from schedserver.server import SchedulerServer

#: A recovering client is sent what was kept for it while fewer bytes than this
#: wait to go out (what is on disk is read back no faster than it takes them).
REPLAY_UNSENT = 8 * 1024 * 1024


class _Clients(_ServerState):
    """Clients' sessions and their computations' recovery."""

    async def _serve(self, conn: Connection, user: str) -> None:
        if user == HEALTH_PROBE:  # no user (`SchedulerServer._secret_of`)
            logger.debug("health probe from %s", conn.peer)
            await conn.send(cast("SchedulerServer", self).health())
            return
        refusal = self._over_sessions(user)
        if refusal:  # each session holds a descriptor: one user cannot take all
            self._session_refusals.event("refused sessions", user, refusal)
            await conn.send(Error(code="quota", message=refusal))
            return
        # a part of SchedulerServer: the session is the whole server's
        session = SchedulerSession(conn, cast("SchedulerServer", self), user)
        session.token = self.users.lookup(user)  # the one just proved
        self.sessions.add(session)
        logger.info("user %r connected from %s", user, conn.peer)
        try:
            await session.serve()
        finally:
            self.sessions.discard(session)
            self._session_ended(session)
            logger.info("user %r (%s) disconnected", user, conn.peer)

    def _over_sessions(self, user: str) -> str:
        """Why one more session of ``user`` is refused ("" if it is not)."""
        quota = self.config.max_sessions
        # One ended, waiting for its client to take why (`SchedulerSession.end`:
        # a zombie stopped with its socket full), is not its user's any more.
        have = sum(1 for s in self.sessions if s.user == user and not s.ending)
        if not quota or have < quota:
            return ""
        return (
            f"refused: user {user!r} has {counted(have, 'session')} open at the "
            f"scheduler, its quota (dispynb-scheduler --max_sessions {quota}); close "
            "a cluster first"
        )

    def new_computation(
        self,
        session: SchedulerSession,
        setup: ComputationSetup,
        bundle: list[memoryview],
    ) -> SharedComputation:
        """A client set a computation up: set it up on every node alive."""
        server = cast("SchedulerServer", self)  # a part of it, as above
        self._end_left_behind(session, setup)
        comp = SharedComputation(server, session, setup, bundle, next(self._orders))
        self.computations.append(comp)
        self.files.claim(comp, [str(entry[1]) for entry in setup.files])
        for node in self.nodes:
            if node.alive:
                self._attach(comp, node)
        if not any(node.alive for node in self.nodes):
            logger.info("%s waits for a node to come up", comp.name)
        return comp

    def _end_left_behind(
        self, session: SchedulerSession, setup: ComputationSetup
    ) -> None:
        """A client back on a new session (it had lost the scheduler: a link cut,
        the scheduler frozen) sets its computation up again: it gave up on the jobs
        it left here (they ended Abandoned, or were submitted again). Kept for it,
        they would run on for nobody, queued ones would even start: terminated.
        Also while its old session seems open (a cut link is noticed later): once
        that ended, the computation would be kept for a recovery nobody makes."""
        if setup.recovery_id is None:
            return
        for old in list(self.computations):
            if (
                old.user == session.user
                and old.setup.recovery_id == setup.recovery_id
                and old.session is not session
                and not old.closing
            ):
                logger.info(
                    "%s: its client set it up again: the jobs it left are terminated",
                    old.name,
                )
                if old.expiry is not None:
                    old.expiry.cancel()
                    old.expiry = None
                old.close(ComputationClose(comp_id=old.comp_id, terminate=True))

    def _session_ended(self, session: SchedulerSession) -> None:
        """A client went away: keep its computations that asked for recovery."""
        loop = asyncio.get_running_loop()
        self.files.release(session)  # files it sent that no computation claims
        self.room_freed(session.user)
        freed = False  # an exclusive computation of it no longer is
        for comp in session.computations.values():
            if comp.session is not session:
                continue
            comp.session = None
            comp.client_gone()
            # A recovering client that left before the jobs ended (its timeout):
            # what they return is kept for the next, not dropped as they end.
            comp.recovering = False
            if comp.closed or comp.closing:
                continue
            if comp.setup.recovery_id is not None and not self.stopping:
                # Kept until the client comes back, for the shorter of the two
                # --keep_results and what is left of --zombie_interval since it was
                # last heard from (a client silent that long is a zombie: closed).
                silent = loop.time() - session.last_heard
                keep = min(
                    comp.setup.keep_results,
                    self.config.keep_results,
                    max(0.0, self.config.zombie_interval - silent),
                )
                # Whole seconds, as a node says it: "3599.75 s" read as a typo.
                logger.info(
                    "%s: client gone; its jobs go on, results kept %.0f s for its "
                    "recover_jobs",
                    comp.name,
                    keep,
                )
                if comp.account.exclusive:
                    # Nobody watches it now: kept for its recover_jobs, it must
                    # not stop every other user's jobs for --keep_results.
                    comp.account.exclusive = False
                    logger.info(
                        "%s: its client is gone: no longer exclusive, other users' "
                        "jobs run",
                        comp.name,
                    )
                    freed = True
                comp.expiry = loop.call_later(keep, self._expire, comp)
                self.leave_the_nodes(comp)
            else:
                comp.close(
                    ComputationClose(
                        comp_id=comp.comp_id, terminate=True, cancel_waiting=True
                    )
                )
        if freed:
            self.schedule()  # the others' jobs that waited for it

    def leave_the_nodes(self, comp: SharedComputation) -> None:
        """``comp``'s client is gone and none of its jobs waits or runs: it is
        closed on the nodes (its processes, workers and connections there go), and
        only what was kept waits for its client, until it expires. Before, each
        killed client's computation held them, idle, for --keep_results."""
        if comp.released or comp.closing or comp.session is not None:
            return
        if comp.queue or comp.running:
            return  # its jobs go on (held ones wait for its client)
        comp.released = True
        logger.info("%s: no job left: closed on the nodes", comp.name)
        close = ComputationClose(comp_id=comp.comp_id)
        for upstream in comp.upstream.values():
            if upstream.conn is not None and not upstream.closed:
                self.write(upstream, close)

    def _expire(self, comp: SharedComputation) -> None:
        if comp.session is None and not comp.closing:
            logger.info("%s: its client did not come back: closed", comp.name)
            comp.close(ComputationClose(comp_id=comp.comp_id, terminate=True))

    def recover(self, session: SchedulerSession, message: Recover) -> None:
        """A client came back for a computation it left (`recover_jobs`)."""
        comp = next(
            (
                c
                for c in self.computations
                if c.user == session.user
                and c.setup.recovery_id == message.recovery_id
                and not c.closing
            ),
            None,
        )
        if comp is None:
            other = any(
                c.setup.recovery_id == message.recovery_id and not c.closing
                for c in self.computations
            )
            session.send(
                Recovered(
                    comp_id=message.comp_id,
                    found=False,
                    running=False,
                    other_user=other,
                )
            )
            return
        if comp.expiry is not None:
            comp.expiry.cancel()
            comp.expiry = None
        if comp.session is not None and comp.session is not session:
            comp.session.computations.pop(comp.client_comp_id, None)
            comp.client_replaced()  # a zombie's files it will not answer for
        comp.session = session
        comp.client_comp_id = message.comp_id
        # What the nodes sent and send it was sized for the client that set it up:
        # cut again to the recovering client's limit (no client takes less than a
        # handshake's).
        comp.client_limit = max(
            message.max_message_size or MAX_MESSAGE_SIZE, PRE_AUTH_MAX_FRAME
        )
        comp.recovering = True
        session.computations[message.comp_id] = comp
        comp.replaying = True
        self._spawn(self._replay(comp, session))

    async def _replay(self, comp: SharedComputation, session: SchedulerSession) -> None:
        """Send a recovering client what was kept for it, oldest first, reading it
        back from disk one message at a time as the client takes it; then
        `Recovered`."""
        comp_id = comp.client_comp_id
        try:
            while comp.kept and comp.session is session and not comp.closed:
                kept_message, buffers = comp.kept.pop()
                kept_message = dataclasses.replace(kept_message, comp_id=comp_id)  # type: ignore[type-var]
                for part, part_buffers in comp.fitted(kept_message, buffers):
                    session.send(part, part_buffers)
                if session.conn.unsent > REPLAY_UNSENT:
                    await session.conn.flush()
        except DispynbError:
            return  # the client went away again: the rest stays kept
        except OSError as exc:
            logger.error("%s: cannot read back what was kept: %s", comp.name, exc)
        finally:
            comp.replaying = False
        if comp.session is session and not comp.closed:
            starts = comp.starts()
            if starts:
                session.send(JobResults(comp_id=comp_id, results=[], started=starts))
            running = bool(comp.queue or comp.running)
            session.send(Recovered(comp_id=comp_id, found=True, running=running))
            comp.report_nodes(force=True)
            comp.finish_if_done()
            self.schedule()  # jobs held while it was away go on
