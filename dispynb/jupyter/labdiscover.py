"""The JupyterLab panel's Discover action: UDP discovery of node servers, from the
kernel (`discover`), and the nodes it found (`Discovered`, shared by the panels)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from dispynb._loop import LoopRunner
from dispynb.jupyter.labtargets import MAX_ADDRESSES, panel_targets

#: Seconds the Discover action listens for answers.
DISCOVERY_TIMEOUT = 2.0


class Discovered:
    """Nodes found by the panel's Discover action (``ip:port`` -> node), shared."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self.running = 0
        self.version = 0
        #: A discovery has answered (the panel then says no node answered, not
        #: "press Discover", of an empty list).
        self.searched = False

    def add(self, nodes: list[dict[str, Any]]) -> None:
        """Keep the nodes a discovery found (none, maybe)."""
        with self._lock:
            self.searched = True
            for node in nodes:
                self._nodes[f"{node['ip_addr']}:{node['port']}"] = node
            self.version += 1

    def nodes(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._nodes.values())

    def busy(self, delta: int) -> None:
        with self._lock:
            self.running += delta
            self.version += 1

    def begin(self, limit: int) -> bool:
        """Count one more discovery running, unless ``limit`` already run."""
        with self._lock:
            if self.running >= limit:
                return False
            self.running += 1
            self.version += 1
            return True


def discover(
    addresses: list[str], timeout: float = DISCOVERY_TIMEOUT
) -> list[dict[str, Any]]:
    """Ping for node servers (those on a network address answer by default; one on
    loopback only with ``--discovery`` if it has a secret); block ``timeout`` s
    (the pings run on dispynb's I/O loop; any thread may call this).

    ``addresses``: as typed in the panel's box (`panel_targets`: addresses of
    nodes, broadcast addresses or host names, each optionally with the nodes' UDP
    discovery port: ``'10.0.0.5'``, ``'node1'``, ``'10.0.0.255:9700'``); empty:
    broadcast on every local network. Returns ``{"ip_addr", "port" (TCP), "name",
    "cpus"}`` for each node that answered. Raises `ConfigurationError` for an
    entry that cannot be pinged, before any ping.
    """
    from dispynb.transport.discovery import BROADCAST, Discovery

    targets = panel_targets(addresses)
    discovery = Discovery(listen=False)  # replies to our pings only
    found: list[dict[str, Any]] = []

    def on_found(ip: str, port: int, name: str, cpus: int) -> None:
        found.append({"ip_addr": ip, "port": port, "name": name, "cpus": cpus})

    async def run() -> None:
        await discovery.start(targets or [BROADCAST], on_found)
        try:
            await asyncio.sleep(timeout)
        finally:
            discovery.close()

    # On the process's one I/O loop (`dispynb._loop`), as clusters do: no loop of
    # its own in this thread, and it works under a running loop (a notebook cell).
    runner = LoopRunner.acquire()
    try:
        runner.run_sync(run)
    finally:
        runner.release()
    return found


__all__ = ["DISCOVERY_TIMEOUT", "MAX_ADDRESSES", "Discovered", "discover"]
