"""`NodeLauncher`: the contract every launcher (SSH, SLURM, Kubernetes...) fulfils.

A launcher starts node servers somewhere (over SSH, as batch jobs, as pods), each with
``dispynb-node --register HOST:PORT`` pointing at the launcher's `Registrar`, and hands
the secret to them without a command line or a shared file. The nodes register with a
proof of the secret; the launcher reports them as they come. A cluster uses a launcher
like a `LocalCluster`::

    with SSHNodes(hosts=["h1", "h2"]) as nodes:
        cluster = JobCluster(compute, nodes=nodes)

``JobCluster`` reads the launcher's ``secret`` (when given none), takes the nodes that
registered so far from `node_specs` (which waits for the first), and `subscribe`\\ s to
later registrations, which it uses like discovered nodes. Nothing in the cluster code
knows which launcher it is.

A subclass provides:

- `_launch` (one node: start it, return a handle of the launcher's choosing),
- `_stop` (stop one launched node, given its handle; idempotent),
- `_exit_reason` (why a launched node ended, or None while it runs),
- optionally `default_count`, `kind` and `_register_to` (the address a node is told
  to register with).

The base class owns the registration listener, the event loop (the process-wide
`LoopRunner`, so callbacks run where the cluster's I/O runs), `start` / `scale` /
`close`, and which launched node each registration is (by the unique name it gets).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

from dispynb._loop import LoopRunner
from dispynb.deploy.registry import RegisteredNode, Registrar
from dispynb.errors import ConfigurationError, DispynbError
from dispynb.secret import resolve_secret
from dispynb.transport.addressing import format_address

logger = logging.getLogger(__name__)

Handle = TypeVar("Handle")

#: Seconds `node_specs` waits for the first node to register.
REGISTER_WAIT = 60.0


class LaunchError(DispynbError):
    """Launched nodes could not be started or did not register."""


@dataclasses.dataclass
class Launched(Generic[Handle]):
    """One node a launcher started: its unique name, handle and registration."""

    name: str
    #: None for a node that registered without being launched here.
    handle: Handle | None
    node: RegisteredNode | None = None


def route_address(host: str, port: int = 22) -> str:
    """The local address this machine would use to reach ``host`` (no packet sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, port))
        except OSError as exc:
            raise ConfigurationError(f"cannot find a route to {host!r}: {exc}") from exc
        return str(sock.getsockname()[0])


class NodeLauncher(abc.ABC, Generic[Handle]):
    """Starts node servers that register with this process; see the module docs.

    Parameters
    ----------
    secret:
        The cluster's secret (str or bytes); default: ``DISPYNB_SECRET(_FILE)``, else
        a new random one that only this launcher's nodes and clusters know.
    register_host:
        The address nodes register with (and, as the registrar's listening address,
        where the client listens); default: every local address, each node being
        told the local address that routes to its host.
    register_port:
        The registration listener's TCP port (0: any free one).
    wait:
        Seconds `node_specs` waits for the first node to register.
    """

    def __init__(
        self,
        *,
        secret: str | bytes | None = None,
        register_host: str | None = None,
        register_port: int = 0,
        wait: float = REGISTER_WAIT,
    ) -> None:
        resolved = resolve_secret(secret)
        if resolved is None:
            resolved = secrets.token_urlsafe(32).encode()
        if b"\n" in resolved or b"\r" in resolved:
            raise ConfigurationError(
                "a launcher hands the secret over as one line: it cannot hold a newline"
            )
        #: The secret nodes and clusters share (`JobCluster` uses it when given none).
        self.secret = resolved
        self.register_host = register_host
        self.wait = wait
        self._launched: list[Launched[Handle]] = []
        self._subscribers: list[Callable[[str, int], None]] = []
        self._changed = threading.Condition()
        self._closed = False
        self._runner = LoopRunner.acquire()
        self._registrar = Registrar(
            self.secret,
            self._registered,
            host=register_host or "0.0.0.0",
            port=register_port,
        )
        try:
            self.register_port = self._runner.run_sync(self._registrar.start)
        except BaseException:
            self._runner.release()
            raise

    # -- what a launcher provides ----------------------------------------------------

    @property
    def default_count(self) -> int:
        """How many nodes `start` launches when not told (SSH: one per host)."""
        return 1

    @abc.abstractmethod
    async def _launch(self, index: int, name: str, register_to: str) -> Handle:
        """Start the ``index``-th node, named ``name`` (``--name``), registering
        with ``register_to`` (``--register``); return its handle. Runs on the loop."""

    @abc.abstractmethod
    async def _stop(self, handle: Handle) -> None:
        """Stop a launched node (it may have ended already); idempotent."""

    @abc.abstractmethod
    def _exit_reason(self, handle: Handle) -> str | None:
        """Why the launched node ended (for error messages), or None if it runs."""

    async def _register_to(self, index: int) -> str:
        """The address the ``index``-th node registers with (``register_host``, by
        default the loopback address; SSH finds the one routing to each host)."""
        return self.register_host or "127.0.0.1"

    # -- the contract's public side -------------------------------------------------

    @property
    def nodes(self) -> list[RegisteredNode]:
        """The nodes that registered so far."""
        with self._changed:
            return [x.node for x in self._launched if x.node is not None]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of the nodes that registered so far."""
        return [(node.host, node.port) for node in self.nodes]

    def exited(self) -> list[str]:
        """``'name: why'`` of each launched node that ended (empty while all run)."""
        with self._changed:
            launched = list(self._launched)
        return [f"{x.name}: {why}" for x in launched if (why := self._reason(x))]

    def start(self, count: int | None = None) -> None:
        """Launch ``count`` more nodes (default `default_count`); they register."""
        if self._closed:
            raise LaunchError("this launcher is closed")
        count = self.default_count if count is None else count
        self._runner.run_sync(self._start, count)

    async def _start(self, count: int) -> None:
        for _ in range(count):
            index = len(self._launched)
            name = f"{self.kind}-{index}-{secrets.token_hex(3)}"
            host = await self._register_to(index)
            register_to = format_address(host, self.register_port)
            handle = await self._launch(index, name, register_to)
            with self._changed:
                self._launched.append(Launched(name, handle))

    @property
    def kind(self) -> str:
        """A short name for node names and logs (``'ssh'``, ``'slurm'``...)."""
        return type(self).__name__.lower()

    def wait_for(self, count: int | None = None, timeout: float | None = None) -> None:
        """Block until ``count`` nodes (default: all launched) registered.

        Raises `LaunchError` if every launched node that has not registered ended, or
        after ``timeout`` seconds (default ``wait``), saying what the nodes reported.
        """
        timeout = self.wait if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                launched = list(self._launched)
                done = sum(1 for x in launched if x.node is not None)
                want = len(launched) if count is None else count
                if done >= want:
                    return
                waiting = [x for x in launched if x.node is None]
                ended = [x for x in waiting if self._reason(x) is not None]
                if len(ended) == len(waiting) or time.monotonic() >= deadline:
                    raise LaunchError(self._not_registered(waiting, timeout))
                self._changed.wait(min(0.2, max(0.0, deadline - time.monotonic())))

    def _not_registered(self, waiting: list[Launched[Handle]], timeout: float) -> str:
        reasons = [f"{x.name}: {self._reason(x) or 'still starting'}" for x in waiting]
        return (
            f"{len(waiting)} launched node(s) did not register with "
            f"{format_address(self.register_host or '*', self.register_port)} "
            f"within {timeout:g} s ({'; '.join(reasons)}). Check the nodes' log "
            "records above (logger dispynb.deploy), that dispynb is installed where "
            "they run, and that they can reach this address (register_host=)"
        )

    def _reason(self, launched: Launched[Handle]) -> str | None:
        if launched.handle is None:
            return None
        return self._exit_reason(launched.handle)

    def node_specs(self) -> list[str]:
        """``'host:port'`` of the nodes registered, after waiting for the first one
        (or for every launched node that is still starting, up to ``wait`` s)."""
        with contextlib.suppress(LaunchError):
            self.wait_for(timeout=self.wait)
        specs = [node.spec for node in self.nodes]
        if not specs:
            self.wait_for(1, timeout=0.0)  # raises, saying why
        return specs

    def subscribe(self, callback: Callable[[str, int], None]) -> None:
        """Call ``callback(host, port)`` on the I/O loop for each node that registers
        from now on (and now for those registered already)."""
        with self._changed:
            self._subscribers.append(callback)
            known = self.nodes
        for node in known:
            self._runner.call_soon(callback, node.host, node.port)

    def close(self) -> None:
        """Stop every launched node and the registration listener; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run_sync(self._close)
        finally:
            self._runner.release()

    async def _close(self) -> None:
        self._registrar.close()
        with self._changed:
            launched = list(self._launched)
        await asyncio.gather(
            *(self._stop(x.handle) for x in launched if x.handle is not None),
            return_exceptions=True,
        )

    def __enter__(self) -> NodeLauncher[Handle]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__}: {len(self._launched)} launched, "
            f"{len(self.nodes)} registered>"
        )

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
            subscribers = list(self._subscribers)
            self._changed.notify_all()
        for callback in subscribers:
            try:
                callback(node.host, node.port)
            except Exception:
                logger.exception("launcher subscriber failed for %s", node.spec)


__all__ = ["LaunchError", "Launched", "NodeLauncher", "route_address"]
