"""The shared scheduler's pulse: pings to the nodes, reports to the clients, and the
end of sessions of revoked users and of silent clients (zombies)."""

from __future__ import annotations

import asyncio
import contextlib

from dispynb.errors import DispynbError
from dispynb.protocol.messages import ComputationClose, Error, Ping
from dispynb.scheduler.link import DEAD_AFTER
from schedserver.session import SchedulerSession
from schedserver.state import _ServerState, logger

#: Seconds of silence, at least, after which an exclusive computation's client
#: no longer stops other users' jobs (`_Pulse._watch_exclusive`): a live client
#: pings every half pulse from its I/O thread, but its program may hold the GIL
#: for seconds (pickling a large argument): a few pulses would take it for
#: stopped, and its nodes would run others' jobs for nothing.
EXCLUSIVE_SILENCE = 10.0


class _Pulse(_ServerState):
    """What the scheduler does every pulse."""

    async def _pulse(self) -> None:
        """Every pulse: watch and ping the nodes, report to clients, end revoked or
        silent users' sessions.

        The loop wakes at the shortest pulse a client asked for (its
        ``pulse_interval``), not only at ``--pulse_interval``: a client declares
        the scheduler dead after three of its own pulses without a word, so a
        client pulsing faster than the scheduler must still hear it in time."""
        loop = asyncio.get_running_loop()
        # Zombies are found within a fifth of --zombie_interval (as dispy does).
        zombie = self.config.zombie_interval
        base = min(self.config.pulse_interval, max(0.1, zombie / 5))
        interval = base
        wake = self._pulse_wake
        while True:
            expected = loop.time() + interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await wake.wait()
            wake.clear()
            now = loop.time()
            # Held up past a node's pulse (starved of CPU, a long callback): the
            # nodes' pulses may be waiting unread, so no node is judged this round
            # (nor a client, for its exclusive hold).
            late = now - expected > self.config.pulse_interval
            self._watch_nodes(now, late)
            # No ping for a node that has not taken what was sent: it hears from
            # us as it reads, and pings would pile up for one that never reads.
            for node in self.nodes:
                if node.conn is not None and not node.conn.unsent:
                    with contextlib.suppress(DispynbError):
                        node.conn.write(Ping())
            for comp in self.computations:
                for upstream in comp.upstream.values():
                    if upstream.conn is None or not upstream.conn.unsent:
                        self.write(upstream, Ping())
            users = self._read_users()
            now = loop.time()
            if users is not None:
                self._end_revoked(users)
            for session in list(self.sessions):
                session.heard_as_it_reads()
                if session.ending:
                    pass  # told why it ends; closed once it took that
                elif users is not None and users.get(session.user) != session.token:
                    pass  # its session ends (`_end_revoked`)
                elif now - session.last_heard > zombie:
                    self._zombie(session, now - session.last_heard)
                else:
                    if not late:
                        self._watch_exclusive(session, now)
                    session.report(self._avail())
            for comp in self.computations:
                comp.report_nodes()
            interval = min([base, *(session.status_every for session in self.sessions)])

    def _read_users(self) -> dict[str, bytes] | None:
        """The users file now (None: it cannot be read: the users known before
        are kept). Its trouble is a warning once, and its end one line: the
        pulse reads it every second."""
        try:
            users = self.users.load()
        except Exception as exc:  # a broken file keeps the users known before
            trouble = str(exc)
            if trouble != self._users_trouble:
                logger.warning(
                    "cannot read the users file (the users read before are kept): %s",
                    trouble,
                )
                self._users_trouble = trouble
            return None
        if self._users_trouble:
            logger.info("the users file is read again")
            self._users_trouble = ""
        return users

    def pulse_changed(self) -> None:
        """A client asked for a shorter pulse: the next one comes at its pace."""
        self._pulse_wake.set()

    def _watch_nodes(self, now: float, late: bool) -> None:
        """Declare dead a node that sent nothing, on any of its connections, for
        `DEAD_AFTER` pulses once it reported on a computation's connection or has
        one ready (it reports on each every ``--pulse_interval`` from the setup on).

        Any bytes count, of a whole frame or not: a node whose reports queue behind
        its results, or behind one large result still arriving, is alive. A dead
        node's connections are closed: its jobs run again elsewhere (reentrant) or
        end abandoned, and `_keep_node` connects again (a stopped node completes no
        handshake, so it stays down until it answers again)."""
        limit = DEAD_AFTER * self.config.pulse_interval
        for node in self.nodes:
            conns = [] if node.conn is None else [node.conn]
            watched = False
            for comp in self.computations:
                upstream = comp.upstream.get(node.name)
                if upstream is not None and upstream.conn is not None:
                    conns.append(upstream.conn)
                    watched = watched or upstream.ready or upstream.reporting
            reads = sum(conn.reads for conn in conns)
            if late or not watched or node.conn is None or reads != node.reads_seen:
                node.reads_seen, node.last_seen = reads, now
                continue
            silent = now - node.last_seen
            if silent <= limit:
                continue
            if any(conn.unread_bytes() for conn in conns):
                node.last_seen = now  # its bytes wait unread (see Connection)
                continue
            logger.warning(
                "node %s sent nothing for %.1f s: declared dead", node.name, silent
            )
            node.dead_reason = f"no pulse for {silent:.1f} s"
            node.alive = False  # no job goes to it from now on
            for conn in conns:
                conn.close()

    def _watch_exclusive(self, session: SchedulerSession, now: float) -> None:
        """An exclusive computation holds every node for its client only while
        that client is heard from: silent for `DEAD_AFTER` of its pulses (or the
        scheduler's, the longer; `EXCLUSIVE_SILENCE` at least), stopped
        (SIGSTOP, Ctrl-Z, a paused VM) or cut off, it lets other users' jobs
        run, and holds them again once its client is heard from (as ever, once
        their running jobs end: none is stopped).
        Before, one stopped notebook stopped every other user's jobs until
        --zombie_interval (an hour) took it for gone. Its own jobs go on
        meanwhile, as a zombie's do until that hour."""
        silent = now - session.last_heard
        pulse = max(self.config.pulse_interval, session.client_pulse)
        heard = (
            silent <= max(DEAD_AFTER * pulse, EXCLUSIVE_SILENCE)
            or session.conn.holds_received  # a message arriving (a large one)
            # Bytes waiting unread (the check ran before the loop read them),
            # unless its reads are held: then its pings wait there however long
            # it has been stopped (it is heard as it takes: `heard_as_it_reads`).
            or (session.conn.unread_bytes() and not session.reads_held)
        )
        if heard:
            if session.exclusive_paused:
                self._exclusive_again(session, now)
            return
        if session.exclusive_paused:
            return
        paused = [
            comp
            for comp in session.computations.values()
            if comp.session is session and comp.account.exclusive and not comp.closing
        ]
        if not paused:
            return
        for comp in paused:
            comp.account.exclusive = False
        session.exclusive_paused = paused
        session.paused_since = session.last_heard
        logger.warning(
            "user %r (%s) silent for %.1f s (stopped, or cut off?): %s no longer "
            "stop%s other users' jobs until it is heard from again",
            session.user,
            session.conn.peer,
            silent,
            ", ".join(comp.name for comp in paused),
            "s" if len(paused) == 1 else "",
        )
        self.schedule()  # the others' jobs that waited for it

    def _exclusive_again(self, session: SchedulerSession, now: float) -> None:
        """The client of exclusive computations that `_watch_exclusive` let go is
        heard from again: they are exclusive again, and it is told what happened."""
        paused, session.exclusive_paused = session.exclusive_paused, []
        again = [c for c in paused if c.session is session and not c.closing]
        for comp in again:
            comp.account.exclusive = True
        if not again:
            return
        # (Heard by its bytes waiting unread, maybe: not yet by a message.)
        silent = now - session.paused_since
        names = ", ".join(comp.name for comp in again)
        logger.info(
            "user %r (%s) heard from again after %.0f s: %s exclusive again once "
            "other users' running jobs end",
            session.user,
            session.conn.peer,
            silent,
            names,
        )
        session.send(
            Error(code="exclusive", message=exclusive_paused_text(silent, names))
        )

    def _zombie(self, session: SchedulerSession, silent: float) -> None:
        """A client not heard from for --zombie_interval (stopped, hung, cut off
        without a reset): close its computations, as dispyscheduler does (running jobs
        terminated, queued ones cancelled, results kept for it dropped: even with a
        recover_file, it could not be told), and end its session.

        The session is told why first (`Error` ``zombie``): a client that was only
        stopped reads it as it runs again, and ends its jobs with that reason
        instead of a lost scheduler's."""
        unread = session.backlog is not None  # dropped with the session
        why = zombie_text(silent, self.config.zombie_interval, unread)
        session.say_last(Error(code="zombie", message=why))
        logger.warning(
            "user %r (%s) silent for %.1f s (--zombie_interval %g min): a zombie; "
            "its computations are closed and its session ended",
            session.user,
            session.conn.peer,
            silent,
            self.config.zombie_interval / 60.0,
        )
        for comp in list(session.computations.values()):
            if comp.session is session and not comp.closing:
                comp.close(
                    ComputationClose(
                        comp_id=comp.comp_id, terminate=True, cancel_waiting=True
                    )
                )
        session.end()

    def revoke_user(self, name: str) -> None:
        """Revoke user ``name`` (as ``user revoke NAME``) and end its sessions now.

        Raises `ConfigurationError` if there is no such user."""
        self.users.revoke(name)
        self._end_revoked(self.users.load())

    def _end_revoked(self, users: dict[str, bytes]) -> None:
        """End the sessions and computations of users no longer in ``users``, and
        the sessions (with their computations) of a credential replaced there.

        Each session is told why first (`Error` ``revoked``): its client ends its
        jobs with that reason and does not try its refused credential again."""
        revoked = [
            session
            for session in self.sessions
            if users.get(session.user) != session.token
            and not (session.conn.closed or session.ending)
        ]
        for session in revoked:
            session.say_last(Error(code="revoked", message=revoked_text(session.user)))
        for comp in list(self.computations):
            if comp.closing:
                continue
            if comp.user not in users or comp.session in revoked:
                # A revoked user's jobs stop too, also those kept for a client that
                # went away (it could never collect them).
                logger.warning("%s: its user was revoked: closed", comp.name)
                comp.close(
                    ComputationClose(
                        comp_id=comp.comp_id, terminate=True, cancel_waiting=True
                    )
                )
        for session in revoked:
            logger.warning("user %r was revoked: ending its session", session.user)
            session.end()

    def _avail(self) -> list[float | None]:
        """The nodes' resources, summed (CPU % averaged); a figure that a node
        cannot read now (None) makes the sum's unknown too, not smaller."""
        reports = [n.avail for n in self.nodes if n.alive and len(n.avail) >= 4]
        if not reports:
            return []
        columns = zip(*(r[:4] for r in reports), strict=True)
        means = (True, False, False, True)
        return [combined_figure(c, m) for c, m in zip(columns, means, strict=True)]


def revoked_text(user: str) -> str:
    """What a revoked user's clients are told."""
    return (
        f"user {user!r} was revoked at the scheduler by its operator: its jobs "
        "were ended and its credential is refused from now on; ask the "
        "scheduler's operator for a new one"
    )


def exclusive_paused_text(silent: float, names: str) -> str:
    """What the client of exclusive computations (``names``) is told that the
    scheduler let other users' jobs run while it was silent for ``silent`` s."""
    return (
        f"the scheduler heard nothing from this client for about {silent:.0f} s "
        "(stopped or suspended: Ctrl-Z, SIGSTOP, a paused VM; or cut off), so "
        f"its exclusive computation {names} let other users' jobs run on its "
        "nodes meanwhile (one silent client must not stop every user's jobs); "
        "its own jobs went on, and it runs alone again once the others' jobs "
        "running now have ended"
    )


def zombie_text(silent: float, interval: float, unread: bool = False) -> str:
    """What a client is told that the scheduler took for a zombie after ``silent``
    seconds (``interval``: its --zombie_interval in seconds; ``unread``: results
    waited for it to read them, dropped with its session)."""
    dropped = (
        " (results that waited for it to read them were dropped with them)"
        if unread
        else ""
    )
    return (
        f"the scheduler heard nothing from this client for {silent:.1f} s (its "
        f"--zombie_interval is {interval / 60.0:g} min) and took it for gone: it "
        f"terminated its running jobs and cancelled its queued ones{dropped}. A client "
        "stopped or suspended that long (Ctrl-Z, SIGSTOP, a paused VM or "
        "container) or cut off loses its jobs so: keep it running, or have the "
        "scheduler's operator raise --zombie_interval"
    )


def combined_figure(values: tuple[float | None, ...], mean: bool) -> float | None:
    """The nodes' figure summed (or averaged); unknown if one node's is."""
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return None
    return sum(known) / len(known) if mean else sum(known)
