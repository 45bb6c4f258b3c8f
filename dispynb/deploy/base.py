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
later registrations, which it uses like discovered nodes (it `unsubscribe`\\ s when it
closes). Nothing in the cluster code knows which launcher it is.

`scale` sets the number of nodes and `adapt` lets it follow the jobs
(`dispynb.deploy.adaptive`): both read the subscribed clusters' public
``workload()`` and drain a node (``close_node``) before stopping it.

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
import collections
import contextlib
import dataclasses
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Self, TypeVar

from dispynb._loop import LoopRunner
from dispynb.deploy.adaptive import Adaptive, AdaptOptions, NodeView, ScaleEvent
from dispynb.deploy.registry import RegisteredNode, Registrar
from dispynb.errors import ConfigurationError, DispynbError
from dispynb.secret import resolve_secret
from dispynb.transport.addressing import format_address

if TYPE_CHECKING:
    from dispynb.deploy.adaptive import ScalableCluster
    from dispynb.status import Workload

logger = logging.getLogger(__name__)

Handle = TypeVar("Handle")

#: Seconds `node_specs` waits for the first node to register.
REGISTER_WAIT = 60.0
#: Seconds a node that registered (or that `node_specs` gave a cluster) counts as
#: busy while some subscribed cluster has not set it up yet: adapt must not stop a
#: node a cluster is still connecting to.
JOIN_GRACE = 30.0
#: Scaling events a launcher keeps (`NodeLauncher.events`).
KEPT_EVENTS = 1000

Subscriber = Callable[[str, int], None]


class LaunchError(DispynbError):
    """Launched nodes could not be started or did not register."""


@dataclasses.dataclass
class Launched(Generic[Handle]):
    """One node a launcher started: its unique name, handle and registration."""

    name: str
    #: None for a node that registered without being launched here.
    handle: Handle | None
    node: RegisteredNode | None = None
    #: Monotonic seconds it was launched, and last had a job (or registered).
    launched_at: float = dataclasses.field(default_factory=time.monotonic)
    last_busy: float = 0.0
    #: Until then (monotonic) it is busy unless every cluster has it (`JOIN_GRACE`).
    joining_until: float = 0.0
    #: Jobs it had finished over every cluster, at the last look (adapt).
    done_seen: int = 0
    #: Being drained to stop (scale-down): offered to no cluster any more.
    draining: bool = False
    #: Stopped on purpose (`scale`, `adapt`), or its stop is under way.
    stopped: bool = False
    #: adapt counted its registration, or its failure to register.
    counted: bool = False


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
        where the client listens); default: every local address, IPv4 and IPv6,
        each node being told the local address that routes to its host.
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
        self._subscribers: list[tuple[Subscriber, ScalableCluster | None]] = []
        self._changed = threading.Condition()
        self._scaling = threading.RLock()  # held for each scaling decision
        self._closed = False
        self._adaptive: Adaptive | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._known_cpus: int | None = None
        #: The latest scaling events (launches, registrations, drains, stops).
        self.events: collections.deque[ScaleEvent] = collections.deque(
            maxlen=KEPT_EVENTS
        )
        self._runner = LoopRunner.acquire()
        self._registrar = Registrar(
            self.secret,
            self._registered,
            host=register_host,
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
        """The nodes that registered so far (and are not being drained or stopped)."""
        with self._changed:
            return [x.node for x in self._in_use() if x.node is not None]

    def _in_use(self) -> list[Launched[Handle]]:
        return [x for x in self._launched if not x.draining and not x.stopped]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of the nodes that registered so far."""
        return [(node.host, node.port) for node in self.nodes]

    def exited(self) -> list[str]:
        """``'name: why'`` of each launched node that ended (empty while all run)."""
        with self._changed:
            launched = list(self._launched)
        return [
            f"{x.name}: {why}"
            for x in launched
            if not x.stopped and (why := self._reason(x))
        ]

    def start(self, count: int | None = None) -> None:
        """Launch ``count`` more nodes (default `default_count`); they register."""
        if self._closed:
            raise LaunchError("this launcher is closed")
        count = self.default_count if count is None else count
        self._runner.run_sync(self._start, count)

    async def _start(self, count: int) -> list[str]:
        names = []
        for _ in range(count):
            index = len(self._launched)
            name = f"{self.kind}-{index}-{secrets.token_hex(3)}"
            try:
                host = await self._register_to(index)
                register_to = format_address(host, self.register_port)
                handle = await self._launch(index, name, register_to)
            except OSError as exc:  # the launcher's program is missing...
                raise LaunchError(f"cannot launch node {name}: {exc}") from exc
            with self._changed:
                self._launched.append(Launched(name, handle))
            names.append(name)
        return names

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
                launched = self._in_use()
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
            given = [x for x in self._in_use() if x.node is not None]
            for x in given:  # a cluster starts on them: not idle while it sets up
                x.joining_until = time.monotonic() + JOIN_GRACE
        specs = [x.node.spec for x in given if x.node is not None]
        if not specs:
            self.wait_for(1, timeout=0.0)  # raises, saying why
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

    def _clusters(self) -> list[ScalableCluster]:
        with self._changed:
            return [c for _, c in self._subscribers if c is not None]

    # -- scaling ----------------------------------------------------------------------

    def scale(self, count: int) -> None:
        """Run ``count`` nodes: launch more, or drain and stop some (those still
        starting first, then the least busy: their running jobs finish first).

        Stops `adapt`. Launches before returning; drained nodes stop once their
        jobs are done (in the background).
        """
        if self._closed:
            raise LaunchError("this launcher is closed")
        if count < 0:
            raise ConfigurationError(f"scale needs a count >= 0, not {count}")
        if self._adaptive is not None:
            self._adaptive.stop()
        with self._scaling:
            with self._changed:
                active = len(self._active())
            if count > active:
                self._scale_up(count - active, f"scale({count})")
            elif count == 0:
                self._drain([x.name for x in self._active()], "scale(0)")
            elif count < active:
                # A fixed target: adapt's choice of nodes to drain, once, now.
                Adaptive(self, AdaptOptions(minimum=count, maximum=count)).step()
        self._ensure_drainer()

    def adapt(
        self,
        minimum: int = 0,
        maximum: int | None = None,
        *,
        idle_timeout: float = 60.0,
        interval: float = 1.0,
        cooldown: float = 10.0,
        cpus_per_node: int | None = None,
    ) -> Adaptive:
        """Grow and shrink the nodes with the jobs of the subscribed clusters.

        Every ``interval`` s: while jobs wait, launch nodes for them (CPUs per node:
        ``cpus_per_node``, else what the nodes registered with), up to ``maximum``
        (default `default_count`); drain and stop nodes idle for ``idle_timeout`` s,
        down to ``minimum``, not within ``cooldown`` s of the last change. A drained
        node gets no new jobs and stops once its running jobs are done. Calling
        ``adapt`` again changes the bounds; `scale` or the returned object's
        ``stop()`` ends it. See `dispynb.deploy.adaptive`.
        """
        if self._closed:
            raise LaunchError("this launcher is closed")
        options = AdaptOptions(
            minimum=minimum,
            maximum=max(self.default_count, minimum) if maximum is None else maximum,
            idle_timeout=idle_timeout,
            interval=interval,
            cooldown=cooldown,
            cpus_per_node=cpus_per_node,
        )
        if self._adaptive is not None:
            self._adaptive.stop()
        self._adaptive = Adaptive(self, options)
        self._adaptive.start()
        return self._adaptive

    def _ensure_drainer(self) -> None:
        """Finish drains in the background (adapt's thread does it while it runs)."""
        with self._changed:
            draining = any(x.draining and not x.stopped for x in self._launched)
        if not draining or (self._adaptive is not None and self._adaptive.running):
            return
        options = AdaptOptions(maximum=1 << 30)
        drainer = Adaptive(self, options, only_drain=True)
        self._adaptive = drainer
        drainer.start()

    def _event(self, action: str, node: str, detail: str) -> None:
        self.events.append(ScaleEvent(time.time(), action, node, detail))
        logger.info("%s: %s node %s (%s)", self.kind, action, node, detail)

    def _active(self) -> list[Launched[Handle]]:
        """Launched nodes neither draining, stopped nor ended (call with the lock)."""
        return [x for x in self._in_use() if self._reason(x) is None]

    def _workloads(self) -> list[tuple[ScalableCluster, Workload]]:
        loads = []
        for cluster in self._clusters():
            try:
                loads.append((cluster, cluster.workload()))
            except Exception as exc:  # closing under us: it unsubscribes
                logger.debug("workload of %r: %s", cluster, exc)
        return loads

    def _cpus_per_node(self) -> int | None:
        """CPUs a node registered with (the latest seen), or None before any."""
        return self._known_cpus

    def _node_views(
        self, loads: list[tuple[ScalableCluster, Workload]], now: float
    ) -> tuple[list[NodeView], int]:
        """The active nodes for `plan`, and the jobs waiting or running on them;
        records when each node last had work."""
        with self._changed:
            active = self._active()
            draining = {
                x.node.spec for x in self._launched if x.draining and x.node is not None
            }
        jobs = 0
        for _, load in loads:
            jobs += load.waiting
            jobs += sum(
                w.jobs for spec, w in load.nodes.items() if spec not in draining
            )
        views = []
        for x in active:
            if x.node is None:
                views.append(NodeView(x.name, False, 0, None))
                continue
            spec = x.node.spec
            work = [load.nodes[spec] for _, load in loads if spec in load.nodes]
            busy = sum(w.jobs for w in work)
            done = sum(w.done for w in work)
            joining = len(work) < max(len(loads), 1) and now < x.joining_until
            if busy or done != x.done_seen or joining:
                x.last_busy = now
                x.done_seen = done
            idle = None if busy else now - x.last_busy
            views.append(NodeView(x.name, True, busy, idle))
        return views, jobs

    def _scale_up(self, count: int, why: str) -> None:
        names = self._runner.run_sync(self._start, count)
        for name in names:
            self._event("launch", name, why)

    def _drain(self, names: list[str], why: str) -> None:
        """Stop sending these nodes jobs; `_finish_drains` stops them once done."""
        with self._changed:
            chosen = [x for x in self._launched if x.name in names and not x.draining]
            for x in chosen:
                x.draining = True
        clusters = self._clusters()
        for x in chosen:
            self._event("drain", x.name, why)
            if x.node is None:
                continue  # still starting: in no cluster, stopped at the next look
            for cluster in clusters:
                cluster.close_node(x.node.spec)

    def _finish_drains(self, loads: list[tuple[ScalableCluster, Workload]]) -> int:
        """Stop the draining nodes no cluster has any more; return how many are
        still draining."""
        with self._changed:
            draining = [x for x in self._launched if x.draining and not x.stopped]
        left = 0
        for x in draining:
            spec = x.node.spec if x.node is not None else None
            holding = [(c, load) for c, load in loads if spec in load.nodes]
            for cluster, load in holding:
                if spec is not None and load.nodes[spec].cpus > 0:
                    cluster.close_node(spec)  # it set the node up after the drain
            if holding:
                left += 1
                continue
            with self._changed:
                x.stopped = True
            self._runner.call_soon(self._spawn_stop, x)
        return left

    def _spawn_stop(self, launched: Launched[Handle]) -> None:
        task = asyncio.get_running_loop().create_task(self._stop_drained(launched))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_drained(self, launched: Launched[Handle]) -> None:
        if launched.handle is not None:
            await self._stop(launched.handle)
        self._event("stopped", launched.name, "drained")

    def _reap_launches(self, now: float) -> tuple[int, int]:
        """``(failed, registered)``: launched nodes that ended or did not register
        within ``wait`` s (those are stopped), and that registered, since the last
        look."""
        failed = registered = 0
        with self._changed:
            fresh = [x for x in self._in_use() if not x.counted]
        for x in fresh:
            if x.node is not None:
                x.counted = True
                registered += 1
                continue
            why = self._reason(x)
            if why is None and now - x.launched_at < self.wait:
                continue
            x.counted = True
            failed += 1
            self._event("failed", x.name, why or f"no registration in {self.wait:g} s")
            if why is None:
                self._drain([x.name], "did not register")
        return failed, registered

    def close(self) -> None:
        """Stop every launched node and the registration listener; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._adaptive is not None:
            self._adaptive.stop()
        try:
            self._runner.run_sync(self._close)
        finally:
            self._runner.release()

    async def _close(self) -> None:
        self._registrar.close()
        with self._changed:
            launched = list(self._launched)
            for x in launched:
                x.stopped = True  # on purpose: not reported by exited()
        await asyncio.gather(
            *(self._stop(x.handle) for x in launched if x.handle is not None),
            *self._stopping,
            return_exceptions=True,
        )

    def __enter__(self) -> Self:
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


__all__ = ["LaunchError", "Launched", "NodeLauncher", "Subscriber", "route_address"]
