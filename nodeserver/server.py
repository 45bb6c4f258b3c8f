"""`NodeServer`: listens for clients, authenticates them, serves their sessions."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
from typing import Any

from dispynb.protocol.messages import Welcome
from dispynb.transport.addressing import format_address
from dispynb.transport.connection import Connection
from dispynb.transport.listener import Listener
from dispynb.transport.tls import server_context
from nodeserver.announce import Announcer
from nodeserver.budget import CpuBudget
from nodeserver.config import NodeConfig
from nodeserver.filestore import FileStore
from nodeserver.keeper import ResultKeeper
from nodeserver.monitor import avail_info
from nodeserver.session import ClientSession
from nodeserver.spool import ResultSpool

logger = logging.getLogger(__name__)


class NodeServer:
    """A node server: one listener, one session per client, one CPU budget.

    Examples
    --------
    >>> server = NodeServer(NodeConfig(port=0, secret=b"s3cret"))  # doctest: +SKIP
    >>> port = await server.start()  # doctest: +SKIP
    """

    def __init__(self, config: NodeConfig) -> None:
        config.validate()
        self.config = config
        self.budget = CpuBudget(config.cpus)
        self.keeper = ResultKeeper(
            ResultSpool(
                os.path.join(config.dest_path, ".kept"), config.kept_results_size
            )
        )
        self.store = FileStore(
            os.path.join(config.dest_path, ".store"), config.max_file_size
        )
        self.sessions: set[ClientSession] = set()
        self.address = ""
        self._listener: Listener | None = None
        self._session_tasks: set[asyncio.Task[None]] = set()
        self._announcer: Announcer | None = None
        #: Set when the node shuts down: jobs sent to it now go straight back.
        self.draining = False

    async def start(self) -> int:
        """Listen and serve; return the bound port (written to ``port_file`` if set)."""
        config = self.config
        ssl_context = (
            server_context(config.certfile, config.keyfile, config.cafile)
            if config.certfile
            else None
        )
        os.makedirs(config.dest_path, mode=0o700, exist_ok=True)
        self.keeper.load()  # results an earlier process kept for crashed clients
        self._listener = Listener(
            self._serve,
            secret=config.secret,
            make_welcome=self._welcome,
            max_message_size=config.max_message_size,
            ssl_context=ssl_context,
        )
        port = self._listener.listen_on(config.host, config.port)
        self.address = format_address(config.host, port)
        if config.discovery:
            self._announcer = Announcer(
                name=config.name,
                tcp_port=port,
                cpus=config.cpus,
                host=config.host,
                port=config.discovery_port,
                multicast=config.ipv4_multicast,
                ext=config.ext_host or "",
            )
            await self._announcer.start()
        if config.port_file:
            tmp = f"{config.port_file}.tmp"
            with open(tmp, "w") as handle:
                handle.write(f"{port}\n")
            os.replace(tmp, config.port_file)
        logger.info(
            "dispynb node %r serving %d CPUs on %s%s%s",
            config.name,
            config.cpus,
            self.address,
            " with TLS" if ssl_context else "",
            "" if config.secret else " WITHOUT a secret (loopback only)",
        )
        return port

    def _welcome(self) -> Welcome:
        return Welcome(
            name=self.config.name,
            cpus=self.config.cpus,
            platform=platform.platform(),
            address=self.address,
            max_message_size=self.config.max_message_size,
            pid=os.getpid(),
            avail=avail_info(self.config.dest_path),
        )

    async def _serve(self, conn: Connection, client_name: str) -> None:
        session = ClientSession(conn, self, client_name)
        self.sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._session_tasks.add(task)
        logger.info("client %r connected from %s", client_name, conn.peer)
        try:
            await session.serve()
        finally:
            self.sessions.discard(session)
            if task is not None:
                self._session_tasks.discard(task)
            logger.info("client %r from %s disconnected", client_name, conn.peer)

    async def stop(
        self, drain_timeout: float = 0.0, now: asyncio.Event | None = None
    ) -> None:
        """Stop listening, hand back unstarted jobs, end every session.

        Running jobs may finish for up to ``drain_timeout`` seconds (0: they are
        terminated at once), or until ``now`` is set; sessions stay up meanwhile, so
        clients still hear pulses and get the results.
        """
        if self._announcer is not None:
            self._announcer.close(leaving=True)
            self._announcer = None
        if self._listener is not None:
            self._listener.stop()
        self.draining = True
        # Jobs that have not started go back to their clients, to run elsewhere.
        await asyncio.gather(
            *(session.hand_back() for session in list(self.sessions)),
            return_exceptions=True,
        )
        if drain_timeout > 0 and (self.sessions or self.keeper.running):
            await self._drain(drain_timeout, now)
        await self.keeper.close()
        for session in list(self.sessions):
            session.conn.close()
        if self._session_tasks:
            # Each session ends its computations (terminating jobs) as it winds down.
            await asyncio.wait(list(self._session_tasks), timeout=30)

    async def _drain(self, timeout: float, now: asyncio.Event | None) -> None:
        """Wait for running jobs to end, at most ``timeout`` s or until ``now``."""
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
        else:
            logger.info("drained: every running job ended")
