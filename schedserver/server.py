"""`SchedulerServer`: owns the nodes, accepts clients, hands CPUs out fairly.

Clients connect as to a node server (the handshake finds the user's token by the
name in its hello, `users.UsersFile`), and each gets a `SchedulerSession`. Each
node gets a control connection (its CPUs, whether it lives) and, per computation,
an `Upstream` connection that carries that computation's jobs and results. The
scheduler keeps the jobs and sends each one to a node only when the node has a free
slot (``--jobs_per_cpu`` per CPU), choosing whose job with `fairshare.FairShare`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from dispynb.backends.finder import NodeFinder
from dispynb.errors import ConfigurationError, DispynbError
from dispynb.httpd.security import is_loopback
from dispynb.node import NodeAllocate, parse_node_specs
from dispynb.protocol.files import digest_of
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationClosed,
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    Error,
    FileFromNode,
    FilePlace,
    FilePlaced,
    FilePut,
    FilesMissing,
    JobProvisional,
    JobResults,
    Message,
    NodeStatus,
    Ping,
    Recover,
    Recovered,
    ResultChunk,
    Welcome,
)
from dispynb.scheduler.policy import window
from dispynb.transport.addressing import format_address
from dispynb.transport.connection import Connection, describe_error
from dispynb.transport.connector import connect
from dispynb.transport.listener import Listener
from schedserver.computation import SharedComputation, Upstream
from schedserver.config import SchedulerConfig
from schedserver.depfiles import ClientFiles
from schedserver.fairshare import FairShare
from schedserver.monitor import SchedulerMonitor
from schedserver.session import SchedulerSession
from schedserver.spill import SpillStore
from schedserver.users import UsersFile

logger = logging.getLogger(__name__)

#: A recovering client is sent what was kept for it while fewer bytes than this
#: wait to go out (what is on disk is read back no faster than it takes them).
REPLAY_UNSENT = 8 * 1024 * 1024

#: Seconds between attempts to reach a node that is down (doubling up to the max).
RECONNECT_FIRST = 0.2
RECONNECT_MAX = 5.0


@dataclass(eq=False)
class NodeState:
    """A node the scheduler owns."""

    host: str
    port: int
    cpus: int = 0
    alive: bool = False
    in_flight: int = 0
    avail: list[float] = field(default_factory=list)
    conn: Connection | None = None
    #: The host name the node reports ("" until it is up).
    hostname: str = ""
    #: Mean run time of its recent jobs (None: unknown), for how many to send ahead.
    mean: float | None = None
    #: ``host:port``.
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = format_address(self.host, self.port)


class SchedulerServer:
    """The shared scheduler (see the module docstring)."""

    def __init__(self, config: SchedulerConfig) -> None:
        config.validate()
        self.config = config
        self.users = UsersFile(config.users_file)
        self.nodes = [NodeState(host, port) for host, port in config.nodes]
        self.sessions: set[SchedulerSession] = set()
        self.computations: list[SharedComputation] = []
        self.fair = FairShare(config.max_cpus)
        self.spill = SpillStore(config.dest_path_prefix, config.kept_memory)
        #: Files clients uploaded, on disk while a computation needs them.
        self.files = ClientFiles(self.spill, config.max_file_size)
        self._wanted: dict[str, set[tuple[SharedComputation, Upstream]]] = {}
        self._orders = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: Listener | None = None
        self._finder: NodeFinder | None = None
        self.monitor: SchedulerMonitor | None = None
        self.port = 0
        self.stopping = False

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> int:
        """Listen for clients and connect to the nodes; return the port."""
        config = self.config
        self.users.load()  # a users file readable by others is refused here
        if config.clean:
            self.spill.clean()
        listener = Listener(
            self._serve,
            secret=self.users.lookup,
            make_welcome=self._welcome,
            max_message_size=config.max_message_size,
            ssl_context=config.client_ssl,
        )
        try:
            for host in config.hosts:
                self.port = listener.listen_on(host, self.port or config.port)
        except BaseException:
            listener.stop()
            raise
        self._listener = listener
        for node in self.nodes:
            self._spawn(self._keep_node(node))
        if config.discover:
            await self._start_discovery()
        if config.httpd:
            self.monitor = SchedulerMonitor.start(
                self,
                config.httpd_host,
                config.httpd_port,
                keyfile=config.httpd_keyfile,
                certfile=config.httpd_certfile,
            )
        self._spawn(self._pulse())
        if config.port_file:
            tmp = f"{config.port_file}.tmp"
            with open(tmp, "w") as handle:
                handle.write(f"{self.port}\n")
            os.replace(tmp, config.port_file)
        logger.info(
            "dispynb-scheduler serving %s on %s for the users in %s",
            ", ".join(
                [node.name for node in self.nodes]
                + [f"nodes found at {spec}" for spec in config.discover]
            ),
            ", ".join(format_address(h, self.port) for h in config.hosts),
            config.users_file,
        )
        return self.port

    async def _start_discovery(self) -> None:
        """Look for nodes matching ``config.discover`` (dispyscheduler's ``-n``
        patterns) as a client does: the nodes found are kept like named ones."""
        config = self.config
        specs = [
            spec for pattern in config.discover for spec in parse_node_specs(pattern)
        ]
        # Ping from the clients' interface if it is a real one (a scheduler for
        # clients on loopback still looks for nodes on every network).
        source = next(
            (h for h in config.hosts if not is_loopback(h) and ":" not in h), None
        )
        finder = NodeFinder(
            specs,
            self._found_node,
            host=source,
            multicast=config.multicast,
            ping_interval=config.ping_interval,
            ready=lambda: any(node.alive for node in self.nodes),
            name_them="dispynb-scheduler -n host1 -n host2",
        )
        try:
            await finder.start()
        except OSError as exc:
            finder.close()
            raise ConfigurationError(
                f"cannot start node discovery ({exc}): name the nodes with -n "
                "HOST[:PORT] instead"
            ) from exc
        self._finder = finder

    def _found_node(self, ip: str, port: int, spec: NodeAllocate) -> None:
        """Discovery found a node: keep it like a named one (once)."""
        if self.stopping or any(n.host == ip and n.port == port for n in self.nodes):
            return
        node = NodeState(ip, port)
        self.nodes.append(node)
        self._spawn(self._keep_node(node))

    async def stop(self) -> None:
        """Stop: close every computation on the nodes (running jobs terminated)."""
        self.stopping = True
        if self._finder is not None:
            self._finder.close()
            self._finder = None
        if self.monitor is not None:
            await self.monitor.stop()
            self.monitor = None
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        for session in list(self.sessions):
            session.conn.close()
        for comp in list(self.computations):
            if not comp.closing:
                comp.close(ComputationClose(comp_id=comp.comp_id, terminate=True))
        waiting = [
            u.task
            for comp in self.computations
            for u in comp.upstream.values()
            if u.task is not None
        ]
        if waiting:
            await asyncio.wait(waiting, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        for node in self.nodes:
            if node.conn is not None:
                node.conn.close()
        self.files.close()
        self.spill.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _welcome(self) -> Welcome:
        return Welcome(
            name=self.config.name,
            cpus=max(1, self.total_cpus()),
            platform=platform.platform(),
            address=format_address(self.config.hosts[0], self.port),
            max_message_size=self.config.max_message_size,
            pid=os.getpid(),
            avail=[],
            boot_id="",  # never shared memory: arguments go on to other machines
        )

    def total_cpus(self) -> int:
        """CPUs of the nodes alive now."""
        return sum(node.cpus for node in self.nodes if node.alive)

    # -- clients -----------------------------------------------------------------------

    async def _serve(self, conn: Connection, user: str) -> None:
        session = SchedulerSession(conn, self, user)
        self.sessions.add(session)
        logger.info("user %r connected from %s", user, conn.peer)
        try:
            await session.serve()
        finally:
            self.sessions.discard(session)
            self._session_ended(session)
            logger.info("user %r (%s) disconnected", user, conn.peer)

    def new_computation(
        self,
        session: SchedulerSession,
        setup: ComputationSetup,
        bundle: list[memoryview],
    ) -> SharedComputation:
        """A client set a computation up: set it up on every node alive."""
        comp = SharedComputation(self, session, setup, bundle, next(self._orders))
        self.computations.append(comp)
        self.files.claim(comp, [str(entry[1]) for entry in setup.files])
        for node in self.nodes:
            if node.alive:
                self._attach(comp, node)
        if not any(node.alive for node in self.nodes):
            logger.info("%s waits for a node to come up", comp.name)
        return comp

    def _session_ended(self, session: SchedulerSession) -> None:
        """A client went away: keep its computations that asked for recovery."""
        loop = asyncio.get_running_loop()
        self.files.release(session)  # files it sent that no computation claims
        for comp in session.computations.values():
            if comp.session is not session:
                continue
            comp.session = None
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
                logger.info(
                    "%s: client gone; its jobs go on, results kept %g s",
                    comp.name,
                    keep,
                )
                comp.expiry = loop.call_later(keep, self._expire, comp)
            else:
                comp.close(
                    ComputationClose(
                        comp_id=comp.comp_id, terminate=True, cancel_waiting=True
                    )
                )

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
            session.send(Recovered(comp_id=message.comp_id, found=False, running=False))
            return
        if comp.expiry is not None:
            comp.expiry.cancel()
            comp.expiry = None
        if comp.session is not None and comp.session is not session:
            comp.session.computations.pop(comp.client_comp_id, None)
        comp.session = session
        comp.client_comp_id = message.comp_id
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
                session.send(
                    dataclasses.replace(kept_message, comp_id=comp_id),  # type: ignore[type-var]
                    buffers,
                )
                if session.conn.unsent > REPLAY_UNSENT:
                    await session.conn.flush()
        except DispynbError:
            return  # the client went away again: the rest stays kept
        except OSError as exc:
            logger.error("%s: cannot read back what was kept: %s", comp.name, exc)
        finally:
            comp.replaying = False
        if comp.session is session and not comp.closed:
            running = bool(comp.queue or comp.running)
            session.send(Recovered(comp_id=comp_id, found=True, running=running))
            comp.report_nodes(force=True)
            comp.finish_if_done()
            self.schedule()  # jobs held while it was away go on

    # -- the nodes ---------------------------------------------------------------------

    async def _keep_node(self, node: NodeState) -> None:
        """Keep a control connection to ``node``: up, down, up again."""
        delay = RECONNECT_FIRST
        while not self.stopping:
            try:
                conn, welcome = await self._connect(node, "dispynb-scheduler")
            except DispynbError as exc:
                logger.debug("node %s: %s", node.name, describe_error(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_FIRST
            node.conn = conn
            cap = self.config.cpus
            node.cpus = min(welcome.cpus, cap) if cap else welcome.cpus
            node.avail = list(welcome.avail)
            node.hostname = welcome.name
            node.alive = True
            logger.info("node %s is up with %d CPUs", node.name, node.cpus)
            for comp in self.computations:
                upstream = comp.upstream.get(node.name)
                if not comp.closing and (
                    upstream is None or upstream.task is None or upstream.task.done()
                ):
                    self._attach(comp, node)

            def on_control(message: Message, buffers: list[memoryview]) -> bool:
                if isinstance(message, NodeStatus):
                    node.avail = list(message.avail)
                return False

            try:
                await conn.dispatch(on_control)
            except DispynbError as exc:
                logger.warning("node %s is down: %s", node.name, describe_error(exc))
            finally:
                conn.close()
                node.conn = None
                node.alive = False

    async def _connect(self, node: NodeState, name: str) -> tuple[Connection, Welcome]:
        return await connect(
            node.host,
            node.port,
            secret=self.config.node_secret,
            max_message_size=self.config.max_message_size,
            ssl_context=self.config.node_ssl,
            name=name,
            retry_for=0.0,
        )

    def _attach(self, comp: SharedComputation, node: NodeState) -> None:
        """Set ``comp`` up on ``node`` over a connection of its own."""
        upstream = Upstream(node)
        comp.upstream[node.name] = upstream
        upstream.task = self._spawn(self._run_upstream(comp, upstream))

    async def _run_upstream(self, comp: SharedComputation, upstream: Upstream) -> None:
        node = upstream.node
        reason = "connection closed"
        try:
            conn, _welcome = await self._connect(node, f"dispynb-scheduler:{comp.user}")
        except DispynbError as exc:
            comp.node_lost(upstream, describe_error(exc))
            self._check_failed(comp)
            return
        if comp.closing:
            conn.close()
            comp.node_lost(upstream, "its computation closed")
            return
        upstream.conn = conn
        setup = dataclasses.replace(
            comp.setup,
            workers=node.cpus,
            pulse_interval=self.config.pulse_interval,
            keep_results=0.0,
            recovery_id=None,
        )
        try:
            conn.write(setup, comp.bundle)
            await conn.dispatch(
                lambda message, buffers: self._from_node(
                    comp, upstream, message, buffers
                )
            )
        except DispynbError as exc:
            reason = describe_error(exc)
        except Exception:  # a bug, or a node message we cannot cope with
            logger.exception("%s: error handling node %s", comp.name, node.name)
            reason = "internal error"
        finally:
            conn.close()
            if upstream.closed:
                reason = "closed"
            comp.node_lost(upstream, reason)
            self._check_failed(comp)
            self.schedule()

    def _from_node(
        self,
        comp: SharedComputation,
        upstream: Upstream,
        message: Message,
        buffers: list[memoryview],
    ) -> bool:
        """One message from a node about ``comp``; True ends reading it."""
        if isinstance(message, JobResults):
            comp.on_results(upstream, message, buffers)
        elif isinstance(message, ResultChunk | JobProvisional | FileFromNode):
            comp.to_client(message, buffers)
        elif isinstance(message, NodeStatus):
            upstream.node.avail = list(message.avail)
        elif isinstance(message, FilesMissing):
            self._give_files(comp, upstream, message.digests)
        elif isinstance(message, FilePlaced):
            comp.placed(message)
        elif isinstance(message, ComputationReady):
            upstream.ready = True
            comp.account.nodes.add(upstream.node.name)
            if not comp.ready_sent:
                comp.ready_sent = True
                comp.to_client(
                    ComputationReady(
                        comp_id=comp.comp_id, workers=max(1, self.total_cpus())
                    )
                )
            comp.report_nodes()
            self.schedule()
        elif isinstance(message, ComputationFailed):
            logger.warning(
                "%s: setup failed on %s: %s",
                comp.name,
                upstream.node.name,
                message.message,
            )
            comp.failures.append(message.message)
            comp.failure_traceback = message.traceback
            return True
        elif isinstance(message, ComputationClosed):
            upstream.closed = True
            return True
        elif isinstance(message, Error):
            logger.warning("node %s reports: %s", upstream.node.name, message.message)
        return False

    def _check_failed(self, comp: SharedComputation) -> None:
        """Every node refused ``comp`` (and none took it): tell its client."""
        if comp.ready_sent or comp.closing or not comp.failures:
            return
        if not all(u.ended for u in comp.upstream.values()):
            return
        comp.ready_sent = True  # answered: no ready after this
        comp.to_client(
            ComputationFailed(
                comp_id=comp.comp_id,
                message="; ".join(comp.failures[-3:]),
                traceback=comp.failure_traceback,
            )
        )

    def check_closed(self, comp: SharedComputation) -> None:
        """``comp`` closing: once every node closed it, tell its client."""
        if comp.closed or not comp.closing:
            return
        if not all(u.closed or u.conn is None for u in comp.upstream.values()):
            return
        comp.closed = True
        if comp in self.computations:
            self.computations.remove(comp)
        self.fair.ended(comp.account, comp.account.in_flight)
        comp.to_client(ComputationClosed(comp_id=comp.comp_id))
        if comp.session is not None:
            comp.session.computations.pop(comp.client_comp_id, None)
        comp.kept.clear()
        self._release_files(comp)
        for upstream in comp.upstream.values():
            if upstream.conn is not None:
                upstream.conn.close()
        self.schedule()

    # -- files -------------------------------------------------------------------------

    def file_put(
        self, session: SchedulerSession, message: FilePut, buffers: list[memoryview]
    ) -> str:
        """A client sent a file: keep it (on disk) for the nodes (that asked, or
        will), as long as a computation that lists it, or ``session``, lives.

        Returns why it was refused ("" if kept): the content must match its digest
        (files are shared by digest between users) and fit --max_file_size.
        """
        if len(buffers) != 1 or digest_of(buffers[0]) != message.digest:
            return f"file {message.digest[:16]}... does not match its digest: refused"
        refused = self.files.put(message.digest, buffers[0], session)
        if refused:
            return refused
        for _comp, upstream in self._wanted.pop(message.digest, set()):
            self.write(upstream, message, buffers)
        return ""

    def _give_files(
        self, comp: SharedComputation, upstream: Upstream, digests: list[str]
    ) -> None:
        missing = []
        for digest in digests:
            data = self.files.get(digest)
            if data is not None:
                self.write(upstream, FilePut(digest=digest, size=data.nbytes), [data])
                del data  # the connection holds the map until it is written
            else:
                self._wanted.setdefault(digest, set()).add((comp, upstream))
                missing.append(digest)
        if missing:
            comp.to_client(FilesMissing(comp_id=comp.comp_id, digests=missing))

    def _release_files(self, comp: SharedComputation) -> None:
        """``comp`` closed: drop the files only it needed, and its wishes."""
        self.files.release(comp)
        for digest in list(self._wanted):
            wanted = {w for w in self._wanted[digest] if w[0] is not comp}
            if wanted:
                self._wanted[digest] = wanted
            else:
                del self._wanted[digest]

    def file_place(self, comp: SharedComputation, message: FilePlace) -> None:
        """``send_file``: place the file on every node where ``comp`` is ready."""
        ready = [u for u in comp.upstream.values() if u.ready and u.conn is not None]
        if not ready:
            comp.to_client(
                FilePlaced(
                    comp_id=comp.comp_id,
                    request=message.request,
                    error="no node is ready for this computation",
                )
            )
            return
        comp.placements[message.request] = [len(ready), ""]
        data = self.files.get(message.digest)
        for upstream in ready:
            if data is not None:
                self.write(
                    upstream, FilePut(digest=message.digest, size=data.nbytes), [data]
                )
            self.write(upstream, dataclasses.replace(message, comp_id=comp.comp_id))

    # -- scheduling --------------------------------------------------------------------

    def write(
        self,
        upstream: Upstream,
        message: Message,
        buffers: list[memoryview] | None = None,
    ) -> None:
        """Send to a node (a lost one is handled by its reader)."""
        if upstream.conn is None:
            return
        try:
            upstream.conn.write(message, buffers or ())
        except DispynbError as exc:
            logger.debug("node %s: %s", upstream.node.name, describe_error(exc))

    def queued_of(self, user: str) -> int:
        """Jobs of ``user`` waiting at the scheduler."""
        return sum(c.account.queued for c in self.computations if c.user == user)

    def job_left(self, comp: SharedComputation, node: NodeState) -> None:
        """A job of ``comp`` no longer holds a slot of ``node``."""
        self.fair.ended(comp.account)
        node.in_flight = max(0, node.in_flight - 1)

    def schedule(self) -> None:
        """Hand free slots out now (a job waits for no other loop turn: W2)."""
        self._dispatch()

    def _dispatch(self) -> None:
        active = []
        for c in self.computations:
            c.account.held = c.held
            if not c.closing and c.queue and not c.account.held:
                active.append(c)
        if not active:
            return
        # Jobs sent ahead of a free CPU (to hide round trips, as many as the jobs'
        # mean duration calls for: the client's policy) run in the node's order,
        # not ours: only a user alone gets them, so that users in contention share
        # what runs, not only what is sent.
        users = {c.user for c in self.computations if c.queue or c.account.in_flight}
        per_cpu = self.config.jobs_per_cpu if len(users) <= 1 else 1
        by_account = {id(c.account): c for c in active}
        accounts = [c.account for c in self.computations if not c.closing]
        batches: dict[
            tuple[int, str], tuple[SharedComputation, Upstream, list[Any]]
        ] = {}
        nodes = [n for n in self.nodes if n.alive]
        waiting = sum(len(c.queue) for c in active)
        progress = True
        while progress and waiting:
            progress = False
            for node in nodes:  # one slot per node per round: spread evenly
                # Before its jobs' duration is known, a node gets one per CPU: a
                # burst of long jobs must not all go to the node ready first.
                ahead = (
                    node.cpus
                    if node.mean is None
                    else min(window(node.cpus, node.mean), node.cpus * per_cpu)
                )
                if node.in_flight >= ahead:
                    continue
                account = self.fair.pick(accounts, node.name)
                if account is None:
                    continue
                comp = by_account[id(account)]
                upstream = comp.upstream[node.name]
                job = comp.queue.popleft()
                self.fair.started(account)
                node.in_flight += 1
                batch = batches.setdefault((id(comp), node.name), (comp, upstream, []))
                batch[2].append(job)
                progress = True
                waiting -= 1
                if not waiting:
                    break
        for comp, upstream, jobs in batches.values():
            comp.send_jobs(upstream, jobs)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "dispatch: %s",
                [
                    (
                        c.name,
                        c.account.queued,
                        c.account.in_flight,
                        sorted(c.account.nodes),
                    )
                    for c in self.computations
                ],
            )

    # -- periodic ----------------------------------------------------------------------

    async def _pulse(self) -> None:
        """Every pulse: ping the nodes, report to clients, end revoked or silent
        users' sessions."""
        loop = asyncio.get_running_loop()
        # Zombies are found within a fifth of --zombie_interval (as dispy does).
        zombie = self.config.zombie_interval
        interval = min(self.config.pulse_interval, max(0.1, zombie / 5))
        while True:
            await asyncio.sleep(interval)
            for node in self.nodes:
                if node.conn is not None:
                    with contextlib.suppress(DispynbError):
                        node.conn.write(Ping())
            for comp in self.computations:
                for upstream in comp.upstream.values():
                    self.write(upstream, Ping())
            try:
                users = self.users.load()
            except Exception as exc:  # a broken file keeps the users known before
                logger.warning("cannot read the users file: %s", exc)
                users = None
            now = loop.time()
            if users is not None:
                self._end_revoked(users)
            for session in list(self.sessions):
                if users is not None and session.user not in users:
                    pass  # its session ends (`_end_revoked`)
                elif now - session.last_heard > zombie:
                    self._zombie(session, now - session.last_heard)
                else:
                    session.report(self._avail())
            for comp in self.computations:
                comp.report_nodes()

    def _zombie(self, session: SchedulerSession, silent: float) -> None:
        """A client not heard from for --zombie_interval (stopped, hung, cut off
        without a reset): close its computations, as dispyscheduler does (running jobs
        terminated, queued ones cancelled, results kept for it dropped: even with a
        recover_file, it could not be told), and end its session."""
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
        """End the sessions and computations of users no longer in ``users``."""
        for comp in list(self.computations):
            if comp.user not in users and not comp.closing:
                # A revoked user's jobs stop too, also those kept for a client that
                # went away (it could never collect them).
                logger.warning("%s: its user was revoked: closed", comp.name)
                comp.close(
                    ComputationClose(
                        comp_id=comp.comp_id, terminate=True, cancel_waiting=True
                    )
                )
        for session in list(self.sessions):
            if session.user not in users and not session.conn.closed:
                logger.warning("user %r was revoked: ending its session", session.user)
                session.end()

    def _avail(self) -> list[float]:
        """The nodes' resources, summed (CPU % averaged)."""
        reports = [n.avail for n in self.nodes if n.alive and len(n.avail) >= 4]
        if not reports:
            return []
        count = len(reports)
        return [
            sum(r[0] for r in reports) / count,
            sum(r[1] for r in reports),
            sum(r[2] for r in reports),
            sum(r[3] for r in reports) / count,
        ]


__all__ = ["NodeState", "SchedulerServer"]
