"""`NodeServer`: listens for clients, authenticates them, serves their sessions."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import platform
import socket
import time
from typing import Any

from dispynb.daemon import replace_file
from dispynb.errors import ConfigurationError
from dispynb.protocol import shm
from dispynb.protocol.handshake import HEALTH_PROBE
from dispynb.protocol.messages import Welcome
from dispynb.transport.addressing import format_address, is_loopback
from dispynb.transport.admission import Tally
from dispynb.transport.connection import Connection
from dispynb.transport.listener import Listener
from dispynb.transport.tls import server_context
from dispynb.transport.udp import is_wildcard_host
from dispynb.wording import counted
from nodeserver.announce import Announcer
from nodeserver.budget import CpuBudget
from nodeserver.config import NodeConfig
from nodeserver.descriptors import Admission
from nodeserver.filestore import FileStore, claim_store
from nodeserver.health import health_of
from nodeserver.keeper import ResultKeeper
from nodeserver.launcher import PROCESS_LAUNCHER, Launcher
from nodeserver.leftovers import Removals
from nodeserver.monitor import avail_info
from nodeserver.platforminfo import node_platform
from nodeserver.privatedir import private_dir
from nodeserver.session import ClientSession
from nodeserver.sharedbody import BODIES
from nodeserver.spool import ResultSpool
from nodeserver.spoolclaim import claim_spool
from nodeserver.workerlife import (
    STOP_SIGNAL_GRACE,
    advise_kill_mode,
    stop_signal_deaths,
)

logger = logging.getLogger(__name__)


class NodeServer:
    """A node server: one listener, one session per client, one CPU budget.

    Examples
    --------
    >>> server = NodeServer(NodeConfig(port=0, secret=b"s3cret"))  # doctest: +SKIP
    >>> port = await server.start()  # doctest: +SKIP
    """

    def __init__(
        self, config: NodeConfig, launcher: Launcher = PROCESS_LAUNCHER
    ) -> None:
        config.validate()
        self.config = config
        #: `time.monotonic` when the node was made (its health probes' uptime).
        self.started = time.monotonic()
        #: Starts each computation's process (`nodeserver.launcher`).
        self.launcher = launcher
        self.budget = CpuBudget(config.cpus)
        #: Computations refused for want of file descriptors (`nodeserver.descriptors`).
        self.descriptors = Admission()
        #: Clients' messages the node cannot use, logged as counts past the first:
        #: a line each let any client grow the node's log at will.
        self.message_refusals = Tally(logging.getLogger("nodeserver.session"))
        private_dir(config.dest_path)  # before anything is kept there
        #: Which kept-results spool is this node's: nodes may share a dest_path,
        #: not a spool (`nodeserver.spoolclaim`).
        self.spool_claim = claim_spool(config.dest_path, config.port)
        root = self.spool_claim.root
        self.keeper = ResultKeeper(
            None if root is None else ResultSpool(root, config.kept_results_size)
        )
        #: Which store is this node's: nodes may share a dest_path, not a store.
        self.store_claim = claim_store(config.dest_path)
        self.store = FileStore(
            self.store_claim.root, config.max_file_size, config.file_cache_size
        )
        #: Computation directories to remove, noted until they are
        #: (`nodeserver.leftovers`: the next node removes them if this one is killed).
        self.removals = Removals(config.dest_path)
        self.sessions: set[ClientSession] = set()
        #: Live computations per directory (`Computation`'s ``path_users``).
        self.path_users: collections.Counter[str] = collections.Counter()
        self.address = ""
        self.port = 0
        self._listener: Listener | None = None
        self._session_tasks: set[asyncio.Task[None]] = set()
        self._announcers: list[Announcer] = []
        #: Set when the node shuts down: jobs sent to it now go straight back.
        self.draining = False
        #: Client connections accepted so far, and those that ended.
        self.clients_accepted = 0
        self.clients_served = 0
        #: `time.monotonic` when the last client session ended (None: none yet).
        self.last_client_left: float | None = None
        #: Why the node takes no new clients for good (``--serve N`` reached);
        #: told to each that connects. None while it takes them.
        self.not_serving: str | None = None
        #: Why it refuses new clients for now (the console's ``stop``), told to
        #: each that connects; None while it takes them (see `hold`).
        self.held: str | None = None
        #: Set when ``config.serve`` clients have been served (``--serve N``).
        self.served_all = asyncio.Event()
        #: Set when a computation called ``dispynode_shutdown()`` and the node runs
        #: with ``--client_shutdown``.
        self.shutdown_requested = asyncio.Event()

    @property
    def _announcer(self) -> Announcer | None:
        return self._announcers[0] if self._announcers else None

    @property
    def listening(self) -> bool:
        """True while the node accepts new clients (see `pause` and `resume`)."""
        return self._listener is not None and self.not_serving is None

    async def start(self, listen: bool = True) -> int:
        """Listen and serve; return the bound port (written to ``port_file`` if set).

        Without ``listen`` the node only gets ready: `resume` opens it later (its
        service window starts later); the port is then 0.
        """
        config = self.config
        private_dir(config.dest_path)  # made again if removed since
        self.keeper.load()  # results an earlier process kept for crashed clients
        if not listen:
            return 0
        return await self.resume()

    async def resume(self) -> int:
        """Accept new clients (again) and answer discovery; return the port.

        The port is the one bound first (``config.port``, or the free one picked).
        """
        config = self.config
        if self._listener is not None or self.not_serving is not None:
            return self.port  # (a service window opening after --serve N: no)
        ssl_context = (
            server_context(config.certfile, config.keyfile, config.cafile)
            if config.certfile
            else None
        )
        listener = Listener(
            self._serve,
            secret=config.secret,
            make_welcome=self._welcome,
            max_message_size=config.max_message_size,
            ssl_context=ssl_context,
            handshake_timeout=config.handshake_timeout,
            # Without a secret (nor client certificates) anyone passes the
            # handshake: only the node's own user may run code here.
            own_user_only=not config.secret and not config.cafile,
        )
        try:
            for host in config.hosts:
                self.port = listener.listen_on(host, self.port or config.port, "--port")
            if config.unix_socket:
                listener.listen_unix(config.unix_socket)
        except BaseException:
            listener.stop()
            raise
        self._listener = listener
        self.address = format_address(config.host, self.port)
        if self.held is not None:  # its service window opened while held
            listener.refuse_all(self.held)
        elif config.discovery:
            await self._start_announcers()
        if config.port_file:
            replace_file(config.port_file, f"{self.port}\n")
        logger.info(
            "dispynb node %r serving %s on %s%s%s",
            config.name,
            counted(config.cpus, "CPU"),
            ", ".join(format_address(host, self.port) for host in config.hosts),
            " with TLS" if ssl_context else "",
            ""
            if config.secret or config.cafile
            else " WITHOUT a secret (loopback only)",
        )
        return self.port

    async def _start_announcers(self) -> None:
        config = self.config
        public = [host for host in config.hosts if not is_loopback(host)]
        for host in public or config.hosts:
            announcer = Announcer(
                name=config.name,
                tcp_port=self.port,
                cpus=config.cpus,
                host=_address_of(host),
                port=config.discovery_port,
                multicast=config.ipv4_multicast,
                ext=config.ext_host or "",
            )
            try:
                await announcer.start()
            except OSError as exc:
                if public:
                    raise
                # Loopback only: clients here can still name the node, so a taken
                # discovery port is no reason not to serve.
                logger.warning(
                    "discovery off: cannot answer pings on UDP %s:%d (%s); clients "
                    "must name this node (nodes=['%s'])",
                    host,
                    config.discovery_port,
                    exc,
                    self.address,
                )
                continue
            self._announcers.append(announcer)

    def pause(self) -> None:
        """Accept no new clients and leave discovery (announcing that); connected
        clients go on."""
        for announcer in self._announcers:
            announcer.close(leaving=True)
        self._announcers.clear()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def hold(self, reason: str) -> None:
        """Refuse new clients for now, telling each ``reason`` (the console's
        ``stop``), and leave discovery; connected clients go on. It listens on: a
        closed port reads to clients as a node that does not run. `unhold` takes
        them again."""
        self.held = reason
        if self._listener is not None:
            self._listener.refuse_all(reason)
        for announcer in self._announcers:
            announcer.close(leaving=True)
        self._announcers.clear()

    async def unhold(self) -> None:
        """Take new clients again after `hold` (unless ``--serve N`` was reached
        meanwhile, or its service window closed it: that window's opening does)."""
        self.held = None
        listener = self._listener
        if listener is None or self.not_serving is not None:
            return
        listener.refusal = None
        if self.config.discovery and not self._announcers:
            await self._start_announcers()

    def set_cpus(self, cpus: int) -> None:
        """Serve ``cpus`` CPUs from now on (the console's ``cpus N``): at most that
        many jobs run at once; clients that connect or discover it from now on are
        told that count."""
        self.config.cpus = cpus
        self.budget.resize(cpus)
        for announcer in self._announcers:
            announcer.cpus = max(1, min(cpus, 0xFFFF))

    def _take_no_more(self, limit: int) -> None:
        """Take no new clients for good (``--serve N`` reached), but go on
        listening to tell each why: a closed port read to clients as a node that
        does not run. Discovery stops (no client is invited)."""
        self.not_serving = (
            f"node {self.config.name!r} serves no more clients: --serve {limit} "
            "reached (it exits once its last client leaves)"
        )
        listener = self._listener
        if listener is not None:
            listener.refuse_all(self.not_serving)
            for announcer in self._announcers:
                announcer.close(leaving=True)
            self._announcers.clear()
        else:
            self.pause()

    def client_shutdown(self, who: str) -> None:
        """``who`` (a job or cleanup) called ``dispynode_shutdown()``."""
        if not self.config.client_shutdown:
            # Counted past the first (a line each: a job calling it in a loop
            # wrote 20,000 lines).
            self.message_refusals.event(
                "dispynode_shutdown() calls ignored",
                who,
                "clients may not stop this node (start it with --client_shutdown "
                "to allow it)",
            )
            return
        if not self.shutdown_requested.is_set():
            logger.warning(
                "%s called dispynode_shutdown(): the node stops (--client_shutdown)",
                who,
            )
            self.shutdown_requested.set()

    def announce(self) -> None:
        """Announce the node to clients now (``--ping_interval``)."""
        for announcer in self._announcers:
            announcer.announce()

    def heard_from(self, hosts: set[str], within: float) -> bool:
        """Whether a session from one of ``hosts`` (IP addresses) is up and its
        client was heard within ``within`` seconds."""
        now = time.monotonic()
        for session in self.sessions:
            peer = session.conn.peer_address
            if (
                peer is not None
                and peer[0].removeprefix("::ffff:") in hosts
                and now - session.last_heard <= within
            ):
                return True
        return False

    async def end_sessions(self) -> None:
        """End every client's computations now: running jobs are terminated,
        unstarted ones handed back (``--service_end``)."""
        draining, self.draining = self.draining, True
        why = f"node {self.config.name!r} ended its service window (--service_end)"
        try:
            await asyncio.gather(
                *(session.hand_back(why) for session in list(self.sessions)),
                return_exceptions=True,
            )
            for session in list(self.sessions):
                session.conn.close()
            if self._session_tasks:
                await asyncio.wait(list(self._session_tasks), timeout=30)
        finally:
            self.draining = draining

    def _welcome(self) -> Welcome:
        return Welcome(
            name=self.config.name,
            cpus=self.config.cpus,
            platform=node_platform(),
            address=self.address,
            max_message_size=self.config.max_message_size,
            pid=os.getpid(),
            avail=avail_info(self.config.dest_path),
            boot_id=shm.boot_id(),
            python=platform.python_version(),
            pid_namespace=shm.pid_namespace(),
        )

    async def _serve(self, conn: Connection, client_name: str) -> None:
        if client_name == HEALTH_PROBE:
            # Not a client (`nodeserver.health`): no session, and it counts for
            # neither --serve nor --exit-without-client.
            logger.debug("health probe from %s", conn.peer)
            await conn.send(health_of(self))
            return
        session = ClientSession(conn, self, client_name)
        self.sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._session_tasks.add(task)
        logger.info("client '%s' connected from %s", client_name, conn.peer)
        self.clients_accepted += 1
        limit = self.config.serve
        if limit > 0 and self.clients_accepted >= limit and self.listening:
            logger.info("serving its last client (--serve %d): no new ones", limit)
            self._take_no_more(limit)
        try:
            await session.serve()
        finally:
            self.sessions.discard(session)
            if not self.sessions:
                BODIES.release()  # no client: no large message to receive soon
            if task is not None:
                self._session_tasks.discard(task)
            logger.info("client '%s' from %s disconnected", client_name, conn.peer)
            self.clients_served += 1
            self.last_client_left = time.monotonic()
            if limit >= 0 and self.clients_served >= limit:
                self.served_all.set()

    async def stop(
        self,
        drain_timeout: float = 0.0,
        now: asyncio.Event | None = None,
        why: str = "",
    ) -> None:
        """Stop listening, hand back unstarted jobs, end every session.

        Running jobs may finish for up to ``drain_timeout`` seconds (0: they are
        terminated at once), or until ``now`` is set; sessions stay up meanwhile, so
        clients still hear pulses and get the results. Clients are told the node
        stops, and ``why`` (say, the signal).
        """
        stopping_since = time.monotonic() - STOP_SIGNAL_GRACE  # its workers' too
        self.draining = True
        leaving = f"node {self.config.name!r} is shutting down"
        leaving += f" ({why})" if why else ""
        if drain_timeout > 0:
            leaving += f"; running jobs may finish within {drain_timeout:g} s"
        self._refuse_while_draining(leaving)
        # Jobs that have not started go back to their clients, to run elsewhere.
        await asyncio.gather(
            *(session.hand_back(leaving) for session in list(self.sessions)),
            return_exceptions=True,
        )
        if drain_timeout > 0 and (self.sessions or self.keeper.running):
            await self._drain(drain_timeout, now, stopping_since)
        advise_kill_mode(stopping_since)
        self.pause()
        await self.keeper.close()
        for session in list(self.sessions):
            session.conn.close()
        if self._session_tasks:
            # Each session ends its computations (terminating jobs) as it winds down.
            await asyncio.wait(list(self._session_tasks), timeout=30)
        # Its files on the disk: a next start after a reboot need not check them.
        await asyncio.to_thread(self.store.close)
        self.store_claim.release()
        self.spool_claim.release()
        self.message_refusals.close()

    def _refuse_while_draining(self, leaving: str) -> None:
        """While the node drains, refuse new connections saying so (``leaving``),
        not with a closed port: ``recover_jobs`` read that as a node that does not
        run. Its kept results stay on its disk, offered once it is started again."""
        for announcer in self._announcers:
            announcer.close(leaving=True)
        self._announcers.clear()
        if self._listener is not None:
            self._listener.refuse_all(
                f"{leaving}; it takes no new connection meanwhile (the results it "
                "keeps for recover_jobs stay on its disk, offered again once it is "
                "started again)"
            )

    async def _drain(
        self, timeout: float, now: asyncio.Event | None, since: float
    ) -> None:
        """Wait for running jobs to end, at most ``timeout`` s or until ``now``;
        say how they ended (those the stop signal, sent to the node ``since``
        then, killed as well did not drain)."""
        logger.info(
            "draining: running jobs may finish for up to %g s (signal again to "
            "terminate them now)",
            timeout,
        )
        drained = asyncio.ensure_future(
            asyncio.gather(
                self.keeper.drain(),
                *(session.drain() for session in list(self.sessions)),
            )
        )
        waiters: set[asyncio.Future[Any]] = {drained}
        if now is not None:
            waiters.add(asyncio.ensure_future(now.wait()))
        await asyncio.wait(waiters, timeout=timeout, return_when="FIRST_COMPLETED")
        finished = drained.done() and not drained.cancelled()
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)  # collect them
        if not finished:
            why = "on request" if now is not None and now.is_set() else "drain timeout"
            logger.warning("terminating the jobs still running (%s)", why)
        elif killed := stop_signal_deaths(since):
            # Signalled with the node (scancel, a systemd unit's KillMode): lost.
            logger.warning(
                "%d running job%s killed by the stop signal, not drained (the "
                "signal reached %s processes too): left to %s clients as jobs of a "
                "lost node",
                killed,
                " was" if killed == 1 else "s were",
                "its" if killed == 1 else "their",
                "its" if killed == 1 else "their",
            )
        else:
            logger.info("drained: every running job ended")


def _address_of(host: str) -> str:
    """``host`` as an IP address for discovery (``-i node1.example.com`` works as in
    dispynode: the name is looked up once, here)."""
    text = host.strip("[]")
    if is_wildcard_host(text):
        return host
    try:
        ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        pass
    else:
        return host
    error: Exception | None = None
    for family in (socket.AF_INET, socket.AF_UNSPEC):  # IPv4 first, as dispynode
        try:
            infos = socket.getaddrinfo(text, None, family, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            error = exc
            continue
        return str(infos[0][4][0])
    raise ConfigurationError(
        f"cannot look up {host!r} to answer discovery on it ({error}): give its IP "
        "address, or --no-discovery"
    )
