"""The user's changes of a running cluster's nodes on the node engine, and their turns.

`allocate_node` (`NodeTurns.add_nodes`), ``set_node_cpus`` and ``deallocate_node``
(`NodeTurns.set_cpus`), `close_node` and `resetup_node` of a `JobCluster` on node
servers. They may come in quick turns on one node (a close while the node is set
up, an allocate while the close is under way): the last call decides, and queued
jobs never see a moment with the node neither released nor connecting (they would
end Abandoned). Node ids that `close_node` released are the driver's
``released`` set: discovery does not bring them back, and queued jobs wait while
one is there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dispynb._loop import LoopRunner
from dispynb.node import NodeAllocate, is_wildcard
from dispynb.scheduler.driver import Allocator, Driver
from dispynb.transport.addressing import format_address, parse_address


class NodeTurns:
    """The part of `NodesBackend` that adds, sizes, closes and sets up again its
    nodes at the user's call (a mixin: the backend gives the attributes below)."""

    driver: Driver
    _runner: LoopRunner
    _released: set[str]
    #: The port of nodes named without one.
    _node_port: int

    if TYPE_CHECKING:  # given by `NodesBackend`

        def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any: ...

        async def _discover(
            self, specs: list[NodeAllocate], ready: Callable[[], bool] | None = None
        ) -> None: ...

        def _allocator(self, spec: NodeAllocate, port: int) -> Allocator: ...

    def add_nodes(self, specs: list[NodeAllocate]) -> None:
        """Use these nodes too (``allocate_node``)."""
        wildcards = [spec for spec in specs if is_wildcard(spec)]
        if wildcards:
            self._runner.run_sync(self._rediscover, wildcards)
        for spec in specs:
            if is_wildcard(spec):
                continue
            port = spec.port or self._node_port
            node_id = format_address(spec.host, port)
            self._on_loop(self._add_node, spec, port, node_id)

    async def _rediscover(self, wildcards: list[NodeAllocate]) -> None:
        """Discover ``wildcards``; nodes released by close_node that they match may
        come back. Released nodes are forgotten on the loop once discovery is on,
        so that queued jobs, which wait while a node is released, never see a
        moment with neither (they would end Abandoned)."""
        await self._discover(wildcards)
        self._released.difference_update(
            node_id
            for node_id in list(self._released)
            if any(spec.matches(parse_address(node_id)[0]) for spec in wildcards)
        )

    def _add_node(self, spec: NodeAllocate, port: int, node_id: str) -> None:
        # Not released any more; here on the loop, with the node connecting (or set
        # up again) in the same step, so that queued jobs keep waiting.
        self._released.discard(node_id)
        link = self.driver.nodes.get(node_id)
        if link is not None and link.closes_sent:
            # close_node still under way: once the node has closed the computation,
            # set it up again (as resetup_node) instead of letting it leave; had it
            # got jobs now, it would refuse them ("not set up on this node").
            link.releasing = False
            link.resetting = True
            link.cpus_asked = None  # all its CPUs, once set up again
        elif link is not None and not link.ready:
            link.releasing = False  # being set up: used once ready, not closed
            link.cpus_asked = None
        elif link is not None:  # known: all its CPUs again (after deallocate_node)
            self.driver.set_cpus(node_id, link.cpus)
        else:
            self.driver.add_node(spec.host, port, self._allocator(spec, port))

    def set_cpus(self, node_id: str, cpus: int) -> int:
        return int(self._on_loop(self.driver.set_cpus, node_id, cpus))

    def close_node(self, node_id: str, terminate: bool) -> bool:
        self._released.add(node_id)
        if not self._on_loop(self.driver.close_node, node_id, terminate):
            self._released.discard(node_id)
            return False
        return True

    def resetup_node(self, node_id: str, terminate: bool) -> bool:
        return bool(self._on_loop(self.driver.resetup_node, node_id, terminate))

    def node_links(self) -> list[tuple[str, str, int]]:
        """``(node_id, host, port)`` of the nodes connected or being connected, set
        up or not: `close_node` may name one before it is ready."""
        return list(self._on_loop(self._node_links))

    def _node_links(self) -> list[tuple[str, str, int]]:
        return [
            (link.node_id, link.host, link.port) for link in self.driver.nodes.values()
        ]


__all__ = ["NodeTurns"]
