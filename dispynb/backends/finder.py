"""`NodeFinder`: the discovery side of a cluster (dispy's ``nodes='*'`` and wildcards).

It owns the client's UDP `Discovery`, matches every node that answers against the
cluster's wildcard specs (a `NodeAllocate` each, so subclasses still choose), and hands
matching nodes to the cluster, which connects and authenticates over TCP.

Where to connect. A node is reached at the address its datagram came from, unless it
announces an ``ext`` address (``dispynb-node --ext-host``: NAT, or a multi-homed node
that wants clients on one of its networks). That address is only a claim, which anyone
on the network could make to steer clients at a third party, so the client follows it
only if it fits one of the user's specs *other than a bare* ``'*'`` (for example
``'10.2.0.*'`` or a named host): an address the user already chose to connect to.
Otherwise the claim is ignored (logged once per node) and the sender's address is used.
Either way the client authenticates the node before sending anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable

from dispynb.node import NodeAllocate
from dispynb.transport.discovery import BROADCAST, Discovery, discovery_targets
from dispynb.wording import counted

logger = logging.getLogger(__name__)

#: ``use(ip, tcp_port, spec)``: connect to a node found for ``spec``.
UseNode = Callable[[str, int, NodeAllocate], None]

#: Where nodes without a secret answer pings: they listen on loopback only.
LOCAL_NODES = "127.0.0.1"

#: Seconds between pings of `LOCAL_NODES`: a node there announces nothing when it
#: starts (it sends no datagram off loopback), so a client started before it finds it
#: only by pinging again.
LOCAL_PING_INTERVAL = 2.0

#: Seconds without a usable node before the client says what may be wrong.
NO_NODE_WARNING = 5.0


class NodeFinder:
    """Finds nodes for wildcard specs by UDP broadcast or multicast; runs on the loop.

    Parameters
    ----------
    specs:
        The wildcard specs, most specific first.
    use:
        Called for each node found that matches a spec.
    host:
        The client's IPv4 address to send from (dispy's ``host``), or None.
    multicast:
        Use dispy's IPv4 multicast group instead of broadcast.
    ping_interval:
        Seconds between pings (dispy's ``ping_interval``), or None for only one.
    ready:
        True once the cluster has a node set up; if it is still False
        ``warn_after`` seconds after `start`, one warning names the likely causes.
    name_them:
        How that warning says to name the nodes instead (the scheduler's way
        differs from a cluster's).
    local:
        Also ping 127.0.0.1 for a bare ``'*'``: a client without a secret or TLS
        can only use nodes without either, and those listen on this machine's
        loopback only (dispynb-node answers pings there then).
    """

    def __init__(
        self,
        specs: list[NodeAllocate],
        use: UseNode,
        *,
        host: str | None = None,
        multicast: bool = False,
        ping_interval: float | None = None,
        ready: Callable[[], bool] | None = None,
        warn_after: float = NO_NODE_WARNING,
        name_them: str = (
            "JobCluster(..., nodes=['host1', 'host2']); or, to run on this machine "
            "alone, start nodes with the program: with LocalCluster() as local: "
            "JobCluster(..., nodes=local)"
        ),
        local: bool = False,
    ) -> None:
        self.specs = specs
        self._local = local
        self._ready = ready
        self._warn_after = warn_after
        self._name_them = name_them
        self._warner: asyncio.Task[None] | None = None
        self._answered = 0
        self._use = use
        self._multicast = multicast
        self._ping_interval = ping_interval
        self._discovery = Discovery(host=host, multicast=multicast)
        self._pinger: asyncio.Task[None] | None = None
        self._ignored_ext: set[tuple[str, str]] = set()

    async def start(self) -> None:
        """Ping the networks of the specs and listen for nodes."""
        targets = self._targets(self.specs)
        await self._discovery.start(targets, self._found)
        if self._ready is not None:
            self._warner = asyncio.get_running_loop().create_task(
                self._warn_if_no_node(targets)
            )
        if self._ping_interval:
            self._pinger = asyncio.get_running_loop().create_task(self._ping_forever())
        self._ping_local_nodes(targets)

    def add(self, specs: list[NodeAllocate]) -> None:
        """More wildcard specs (``discover_nodes``): ping their networks now."""
        self.specs.extend(specs)
        targets = self._targets(specs)
        self._discovery.ping(targets)
        self._ping_local_nodes(targets)

    def _ping_local_nodes(self, targets: list[str]) -> None:
        """Without ``ping_interval``, keep pinging 127.0.0.1 (if a target), so that
        nodes started there later are found, as broadcasting nodes are."""
        if LOCAL_NODES in targets and self._pinger is None:
            self._pinger = asyncio.get_running_loop().create_task(
                self._ping_local_forever()
            )

    async def _ping_local_forever(self) -> None:
        while True:
            await asyncio.sleep(LOCAL_PING_INTERVAL)
            self._discovery.ping([LOCAL_NODES])

    def _targets(self, specs: list[NodeAllocate]) -> list[str]:
        return ping_targets(specs, multicast=self._multicast, local=self._local)

    def forget(self, ip: str, port: int) -> None:
        """A node was lost: use it again when it answers again."""
        self._discovery.forget(ip, port)

    def close(self) -> None:
        """Stop pinging and listening."""
        for task in (self._pinger, self._warner):
            if task is not None:
                task.cancel()
        with contextlib.suppress(OSError):
            self._discovery.close()

    async def _ping_forever(self) -> None:
        assert self._ping_interval
        while True:
            await asyncio.sleep(self._ping_interval)
            self._discovery.ping_again()

    async def _warn_if_no_node(self, targets: list[str]) -> None:
        assert self._ready is not None
        await asyncio.sleep(self._warn_after)
        if self._ready():
            return
        port = self._discovery.port
        if self._answered:
            # Found, then refused or failing: their warnings above say why (another
            # secret, another Python...), not the causes of silence below.
            logger.warning(
                "no node set up in %g s of discovery: %s answered (pinged %s on UDP "
                "port %d) but none is set up yet: see the warnings above; still "
                "waiting, as dispy does",
                self._warn_after,
                counted(self._answered, "node"),
                ", ".join(targets),
                port,
            )
            return
        unsent = self._discovery.unsent
        if unsent:
            self._warn_unsent(unsent, targets)
            return
        logger.warning(
            "no node found in %g s of discovery (pinged %s on UDP port %d; no node "
            "answered); still waiting, as dispy does. Likely causes: no dispynb-node "
            "running on these networks; nodes started with --no-discovery, or "
            "listening on 127.0.0.1 only (no secret: only clients of their machine "
            "without one find them); a firewall dropping UDP %d-%d. Not a wrong "
            "secret: discovery carries none, and a node with another one answers, "
            "then refuses the client saying so. Or name the nodes: %s",
            self._warn_after,
            ", ".join(targets),
            port,
            port,
            port + 1,
            self._name_them,
        )

    def _warn_unsent(self, unsent: dict[str, str], targets: list[str]) -> None:
        """The no-node warning when pings could not even be sent (an address
        without a broadcast address and no default route: 'Network is
        unreachable'): no node could have answered those."""
        failed = ", ".join(f"{where} ({why})" for where, why in unsent.items())
        sent = [t for t in targets if t not in unsent and t != BROADCAST]
        also = f"; pinged {', '.join(sent)} too, no node answered" if sent else ""
        unreachable = {os.strerror(errno.ENETUNREACH), os.strerror(errno.EHOSTUNREACH)}
        why = (
            "this machine has no route to the nodes' network (no address on it, no "
            "default route)"
            if set(unsent.values()) <= unreachable
            else "this machine refused to send it"
        )
        logger.warning(
            "no node found in %g s of discovery: could not send its ping to %s on "
            "UDP port %d%s; still waiting, as dispy does. The ping never left: %s. "
            "Name the nodes: %s; or give this machine an address on the nodes' "
            "network (or a route there) for discovery to reach them",
            self._warn_after,
            failed,
            self._discovery.port,
            also,
            why,
            self._name_them,
        )

    def _found(self, ip: str, port: int, name: str, cpus: int) -> None:
        self._answered += 1
        ext = self._discovery.ext_address(ip, port)
        if ext:
            spec = trusted_ext_spec(self.specs, ext)
            if spec is not None:
                logger.info(
                    "discovered node %s (%s:%d), reached at its ext address %s",
                    name,
                    ip,
                    port,
                    ext,
                )
                self._use(ext, port, spec)
                return
            if (ip, ext) not in self._ignored_ext:
                self._ignored_ext.add((ip, ext))
                logger.info(
                    "node %s at %s announces ext address %s, which fits no node spec "
                    "narrower than '*': using %s (name a spec such as '%s' to use it)",
                    name,
                    ip,
                    ext,
                    ip,
                    ext,
                )
        for spec in self.specs:
            if spec.matches(ip, name):
                # (debug, as dispy's: one line a node would fill a script's stderr)
                logger.debug("discovered node %s (%s:%d)", name, ip, port)
                self._use(ip, port, spec)
                return
        logger.debug("node %s at %s matches no node spec", name, ip)


def ping_targets(
    specs: list[NodeAllocate], *, multicast: bool = False, local: bool = False
) -> list[str]:
    """Where to ping for ``specs``: their networks' broadcast (or the multicast
    group), and with ``local`` also 127.0.0.1 if a node there would fit a spec.

    >>> ping_targets([NodeAllocate("10.2.0.*")])
    ['10.2.0.255']
    >>> ping_targets([NodeAllocate("*")], local=True)
    ['<broadcast>', '127.0.0.1']
    >>> ping_targets([NodeAllocate("127.0.0.*")], local=True)
    ['127.0.0.255', '127.0.0.1']
    >>> ping_targets([NodeAllocate("10.2.0.*")], local=True)
    ['10.2.0.255']
    """
    targets = discovery_targets([s.host for s in specs], multicast) or [BROADCAST]
    if local and any(spec.matches(LOCAL_NODES) for spec in specs):
        targets.append(LOCAL_NODES)
    return targets


def trusted_ext_spec(specs: list[NodeAllocate], ext: str) -> NodeAllocate | None:
    """The first spec that lets the client connect to a node's claimed ``ext`` address.

    Only specs narrower than a bare ``'*'`` count, and only the address is matched
    (never the node's name, which is a claim too).

    >>> trusted_ext_spec([NodeAllocate("*")], "10.2.0.5") is None
    True
    >>> specs = [NodeAllocate("*"), NodeAllocate("10.2.0.*")]
    >>> trusted_ext_spec(specs, "10.2.0.5").host
    '10.2.0.*'
    >>> trusted_ext_spec(specs, "10.3.0.5") is None
    True
    """
    for spec in specs:
        if spec.host.strip() != "*" and spec.matches(ext):
            return spec
    return None
