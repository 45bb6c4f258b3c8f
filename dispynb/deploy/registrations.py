"""A launcher's nodes as they register: waiting for them, and handing them to the
clusters (`node_specs`, `subscribe`)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from dispynb.deploy.adaptive import ScaleEvent
from dispynb.deploy.launcherstate import (
    JOIN_GRACE,
    Handle,
    Launched,
    LaunchError,
    Subscriber,
)
from dispynb.deploy.registry import RegisteredNode
from dispynb.deploy.scaling import _Scaling
from dispynb.transport.addressing import format_address

if TYPE_CHECKING:
    from dispynb.deploy.adaptive import ScalableCluster

logger = logging.getLogger("dispynb.deploy.base")


class _Registrations(_Scaling[Handle]):
    """The registered nodes, waiting for them, and the clusters subscribed to them."""

    @property
    def nodes(self) -> list[RegisteredNode]:
        """The nodes that registered and still run (not being drained or stopped,
        and not ended: a node that died is in `exited`, not here)."""
        with self._changed:
            return [x.node for x in self._active() if x.node is not None]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of the nodes that registered so far."""
        return [(node.host, node.port) for node in self.nodes]

    def exited(self) -> list[str]:
        """How each launched node that ended did (empty while all run):
        ``'host:port (name: why)'``, its address first (unbracketed) as a
        `LocalCluster`'s ``exited()`` says it (a notebook's node panel marks that
        row gone), or ``'name: why'`` for one that ended before it registered."""
        with self._changed:
            launched = list(self._launched)
        return [
            f"{x.node.host}:{x.node.port} ({x.name}: {why})"
            if x.node
            else f"{x.name}: {why}"
            for x in launched
            if not x.stopped and (why := self._reason(x))
        ]

    def exit_reason(self, host: str, port: int) -> str | None:
        """Why the node at ``host:port`` will not serve again: one this launcher
        started whose process (ssh session, batch job...) has ended; None while it
        runs, or if it is not one of ours. A cluster asks it before reconnecting to
        a lost node (`DriverConfig.node_exited`), so that the jobs waiting for that
        node end at once saying why. Does not block."""
        spec = format_address(host, port)
        with self._changed:
            launched = [x for x in self._launched if x.node and x.node.spec == spec]
        for x in reversed(launched):  # the latest node registered there
            why = self._reason(x)
            if why is None:
                return None
            return (
                f"node {x.name} ({spec}) that {type(self).__name__} launched has "
                f"ended: {why}"
            )
        return None

    def expecting_nodes(self) -> bool:
        """Whether a node may still register: one launched has not ended (it runs,
        is starting, or waits in a batch queue, requeued), or `adapt` may launch
        more. A cluster's queued jobs wait for them; without, they end (no node is
        coming). Does not block."""
        if self._adaptive is not None and self._adaptive.adapting:
            return True
        with self._changed:
            return bool(self._active())

    def wait_for(self, count: int | None = None, timeout: float | None = None) -> None:
        """Block until ``count`` nodes (default: all launched) registered.

        Raises `LaunchError` if every launched node that has not registered ended, or
        after ``timeout`` seconds (default ``wait``), saying what the nodes reported.
        """
        timeout = self.wait if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                launched = self._in_use()
                done = sum(1 for x in launched if x.node is not None)
                want = len(launched) if count is None else count
                if done >= want:
                    return
                waiting = [x for x in launched if x.node is None]
                ended = [x for x in waiting if self._reason(x) is not None]
                if len(ended) == len(waiting) or time.monotonic() >= deadline:
                    raise LaunchError(self._not_registered(waiting, timeout))
                seen = self._changed.count
            # Asleep without the lock, not in Condition.wait (see `Changes`); a
            # node's end is not announced: looked at every 0.2 s.
            left = max(0.0, deadline - time.monotonic())
            self._changed.wait_unlocked(seen, min(0.2, left))

    def _not_registered(self, waiting: list[Launched[Handle]], timeout: float) -> str:
        if not waiting:
            return (
                "no node is running or starting: start(n), scale(n) or adapt() "
                "launches them"
            )
        # The address the nodes were told (the local one routing to them), not
        # the listener's "*": the one they must reach.
        told = sorted({x.register_to for x in waiting if x.register_to})
        where = " or ".join(told) or format_address(
            self.register_host or "*", self.register_port
        )
        reasons = [f"{x.name}: {self._reason(x) or self._still(x)}" for x in waiting]
        if all(self._reason(x) is not None for x in waiting):
            what = f"exited before registering with {where}"
        else:
            what = f"did not register with {where} within {timeout:g} s"
        return (
            f"{len(waiting)} launched node(s) {what} ({'; '.join(reasons)}). Check "
            "the nodes' log records above (logger dispynb.deploy), that dispynb is "
            "installed where they run, and that they can reach this address "
            "(register_host=)"
        )

    def _still(self, launched: Launched[Handle]) -> str:
        if launched.handle is None:
            return "still starting"
        return self._starting(launched.handle)

    def node_specs(self) -> list[str]:
        """``'host:port'`` of the nodes registered, after waiting for the first one
        (or for every launched node that is still starting, up to ``wait`` s).

        While `adapt` runs with no node (``minimum=0``), one is launched: a cluster
        starts on a node; adapt stops it later if no job comes.
        """
        if self._adaptive is not None and self._adaptive.adapting:
            with self._scaling:
                with self._changed:
                    starting = not self._in_use()
                if starting:  # adapt(minimum=0): a cluster still needs a first node
                    self._scale_up(1, "a cluster needs a first node")
        with contextlib.suppress(LaunchError):
            self.wait_for(timeout=self.wait)
        with self._changed:
            given = [x for x in self._active() if x.node is not None]
            for x in given:  # a cluster starts on them: not idle while it sets up
                x.joining_until = time.monotonic() + JOIN_GRACE
        specs = [x.node.spec for x in given if x.node is not None]
        if not specs:
            with self._changed:
                waiting = [x for x in self._in_use() if x.node is None]
            raise LaunchError(self._not_registered(waiting, self.wait))
        return specs

    def subscribe(
        self, callback: Subscriber, cluster: ScalableCluster | None = None
    ) -> None:
        """Call ``callback(host, port)`` on the I/O loop for each node that registers
        from now on (and now for those registered already).

        ``cluster``: the cluster the callback feeds; `scale` and `adapt` read its
        ``workload()`` and drain nodes with its ``close_node`` before stopping them.
        """
        with self._changed:
            self._subscribers.append((callback, cluster))
            known = self.nodes
        for node in known:
            self._runner.call_soon(callback, node.host, node.port)

    def unsubscribe(self, callback: Subscriber) -> None:
        """Stop calling ``callback`` (and reading its cluster); unknown ones are
        ignored."""
        with self._changed:
            self._subscribers = [s for s in self._subscribers if s[0] != callback]

    # -- on the loop ------------------------------------------------------------------

    def _registered(self, node: RegisteredNode) -> None:
        with self._changed:
            match = next((x for x in self._launched if x.name == node.name), None)
            if match is None:
                logger.warning(
                    "node %s at %s registered with a valid proof but was not "
                    "launched by this %s: used anyway (it knows the secret)",
                    node.name,
                    node.spec,
                    type(self).__name__,
                )
                match = Launched(node.name, None)
                self._launched.append(match)
            match.node = node
            match.last_busy = time.monotonic()
            match.joining_until = match.last_busy + JOIN_GRACE
            self._known_cpus = node.cpus
            subscribers = [] if match.draining else [c for c, _ in self._subscribers]
            self._changed.notify_all()
        if match.handle is not None:
            self.events.append(
                ScaleEvent(time.time(), "registered", node.name, node.spec)
            )
        for callback in subscribers:
            try:
                callback(node.host, node.port)
            except Exception:
                logger.exception("launcher subscriber failed for %s", node.spec)
