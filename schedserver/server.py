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
import errno
import os
import platform
import time

from dispynb._version import __version__
from dispynb.backends.finder import NodeFinder
from dispynb.daemon import replace_file
from dispynb.deploy.registry import RegisteredNode, Registrar
from dispynb.errors import ConfigurationError
from dispynb.httpd.security import is_loopback
from dispynb.node import NodeAllocate, parse_node_specs
from dispynb.protocol.handshake import HEALTH_PROBE
from dispynb.protocol.messages import (
    ComputationClose,
    NodeHealth,
    NodeStatus,
    Welcome,
)
from dispynb.transport.addressing import format_address
from dispynb.transport.listener import Listener
from dispynb.wording import counted
from nodeserver.privatedir import private_dir
from schedserver.clients import _Clients
from schedserver.dispatch import _Dispatch
from schedserver.filerelay import _FileRelay
from schedserver.monitor import SchedulerMonitor
from schedserver.nodelinks import _NodeLinks
from schedserver.pulse import _Pulse
from schedserver.state import NodeState, _ServerState, logger


class SchedulerServer(
    _Clients, _NodeLinks, _FileRelay, _Dispatch, _Pulse, _ServerState
):
    """The shared scheduler (see the module docstring).

    Its parts: `clients` (sessions, recovery), `nodelinks` (connections to the
    nodes), `filerelay` (files), `dispatch` (jobs to free slots), `pulse` (pings,
    reports, zombies, revoked users); their shared state is `state._ServerState`.
    """

    async def start(self) -> int:
        """Listen for clients and connect to the nodes; return the port."""
        config = self.config
        self.users.load()  # a users file readable by others is refused here
        # Users' files and kept results spill there: another user's directory is
        # refused (its default is in /tmp, where anyone may make it first).
        private_dir(config.dest_path_prefix, "--dest_path_prefix")
        self.spill.hold()
        if config.clean:
            removed = self.spill.clean()
            logger.info(
                "--clean: removed %s left by schedulers killed in %s",
                counted(removed, "spill directory", "spill directories"),
                config.dest_path_prefix,
            )
        listener = Listener(
            self._serve,
            secret=self._secret_of,
            make_welcome=self._welcome,
            max_message_size=config.max_message_size,
            ssl_context=config.client_ssl,
            handshake_timeout=config.handshake_timeout,
            server="scheduler",
        )
        try:
            for host in config.hosts:
                self.port = listener.listen_on(
                    host, self.port or config.port, "-p/--port"
                )
        except BaseException:
            listener.stop()
            raise
        self._listener = listener
        for node in self.nodes:
            self._spawn(self._keep_node(node))
        if config.discover:
            await self._start_discovery()
        if config.register_port is not None:
            await self._start_registrations()
        if config.httpd:
            self.monitor = SchedulerMonitor.start(
                self,
                config.httpd_host,
                config.httpd_port,
                keyfile=config.httpd_keyfile,
                certfile=config.httpd_certfile,
                token_file=config.httpd_token_file,
            )
        self._spawn(self._pulse())
        if config.port_file:
            replace_file(config.port_file, f"{self.port}\n")
        # Where clients connect first: "serving 10.0.0.5:9711 on ..." read as a
        # node listening there.
        logger.info(
            "dispynb-scheduler serving the users in %s on %s, with %s",
            config.users_file,
            ", ".join(format_address(h, self.port) for h in config.hosts),
            ", ".join(
                [f"node {node.name}" for node in self.nodes]
                + [f"nodes found at {spec}" for spec in config.discover]
                + (
                    [f"nodes registering on port {self._registrars[0].port}"]
                    if self._registrars
                    else []
                )
            ),
        )
        self._say_exclusive_users()
        if not os.path.lexists(config.users_file):
            # A typo, or the scheduler started before its first user: say it once
            # here rather than only as each user's refused connection.
            logger.warning(
                "the users file %s does not exist: no user can connect until "
                "'dispynb-scheduler user add NAME --users %s' makes it (read as it "
                "changes)",
                config.users_file,
                config.users_file,
            )
        return self.port

    def _say_exclusive_users(self) -> None:
        """Log who may run exclusive clusters, unless nobody (the default), and
        warn of a name in --exclusive_users that is no user (a typo, most likely:
        that user's exclusive clusters would run shared)."""
        allowed = self.config.exclusive_users
        if allowed is None:
            logger.info("exclusive clusters: any user's (--exclusive_users all)")
            return
        if not allowed:
            return
        logger.info(
            "exclusive clusters: for %s only (--exclusive_users)",
            ", ".join(sorted(allowed)),
        )
        unknown = sorted(allowed - self.users.names())
        if unknown:
            logger.warning(
                "--exclusive_users names %s, not in the users file %s: a typo? (a "
                "user added later with that name may run exclusive clusters)",
                ", ".join(repr(name) for name in unknown),
                self.config.users_file,
            )

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
            # Without a node secret or TLS the scheduler can use only nodes without
            # either, which serve this machine's loopback alone: ping it too, as a
            # client without a secret does.
            local=not (config.node_secret or config.node_ssl),
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
        self._add_node(ip, port)

    async def _start_registrations(self) -> None:
        """Listen for nodes registering themselves (``--register_port``) on each of
        the clients' interfaces, on one port; the `Registrar` checks their proof of
        the node secret, refuses and logs (once per address) any other."""
        assert self.config.node_secret  # validate() insists
        port = self.config.register_port or 0
        try:
            for host in self.config.hosts:
                registrar = Registrar(
                    self.config.node_secret,
                    self._registered,
                    host=host,
                    port=port,
                    secret_name="this scheduler's node secret (--node_secret_file "
                    "or DISPYNB_SECRET; the node's --secret-file must hold it)",
                )
                self._registrars.append(registrar)
                port = await registrar.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # may pass (exit 1): a port still held
                where = format_address(host, port)
                raise OSError(
                    exc.errno,
                    f"node registrations: {where} is already in use (by a node or "
                    "scheduler already running, or another program): stop it, or "
                    "give another --register_port",
                ) from None
            raise ConfigurationError(
                f"cannot listen for node registrations on port {port} "
                f"({exc.strerror or exc}): give another --register_port"
            ) from exc

    def _registered(self, reg: RegisteredNode) -> None:
        """A node proved the secret: keep it like a named one. The `Registrar`
        reports a boot of a node once (a node registering again to see that its
        scheduler lives is not reported again); a node that restarted (a new boot
        id) at an address kept already is reconnected by its `_keep_node`."""
        self._add_node(reg.host, reg.port, registered=True)

    def _add_node(self, host: str, port: int, registered: bool = False) -> None:
        if self.stopping or any(n.host == host and n.port == port for n in self.nodes):
            return
        node = NodeState(host, port, registered=registered)
        self.nodes.append(node)
        self._spawn(self._keep_node(node))

    async def stop(self, why: str = "") -> None:
        """Stop: close every computation on the nodes (running jobs terminated).

        ``why`` (the signal's name) is said to the clients first, as a stopping
        node says it: their jobs that end with it say the scheduler stopped, and
        why, not that a connection closed."""
        self.stopping = True
        for session in list(self.sessions):
            if why and not session.conn.closed:
                leaving = f"the scheduler is shutting down ({why})"
                session.send(NodeStatus(avail=[], leaving=leaving))
        if self._finder is not None:
            self._finder.close()
            self._finder = None
        for registrar in self._registrars:
            registrar.close()
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
        self._session_refusals.close()
        self.message_refusals.close()

    def _secret_of(self, name: str) -> bytes | None:
        """The secret a client named ``name`` proves: its user's credential; the
        node secret for a health probe (``dispynb-scheduler --check``: its name is
        no user's, `check_name`), which gets one `NodeHealth` and nothing else."""
        if name == HEALTH_PROBE:
            return self.config.node_secret
        return self.users.lookup(name)

    def health(self) -> NodeHealth:
        """How the scheduler is now, for a health probe."""
        return NodeHealth(
            name=self.config.name,
            version=__version__,
            pid=os.getpid(),
            uptime=round(time.monotonic() - self.started, 3),
            cpus=self.total_cpus(),
            busy=sum(node.in_flight for node in self.nodes if node.alive),
            clients=len(self.sessions),
            computations=len(self.computations),
            serving=self._listener is not None,
            draining=bool(self.stopping),
            server="scheduler",
        )

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


__all__ = ["NodeState", "SchedulerServer"]
