"""What every part of `NodeLauncher` shares: the nodes it launched (`Launched`),
the contract a launcher provides (`_launch`, `_stop`, `_exit_reason`...), and
launching them (failing with `dispynb.errors.LaunchError`)."""

from __future__ import annotations

import _thread
import abc
import asyncio
import collections
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from dispynb._interruptible import Sleepers
from dispynb._loop import LoopRunner
from dispynb.deploy.adaptive import Adaptive, ScaleEvent
from dispynb.deploy.registry import RegisteredNode, Registrar
from dispynb.errors import LaunchError as LaunchError
from dispynb.transport.addressing import format_address

if TYPE_CHECKING:
    from dispynb.deploy.adaptive import ScalableCluster

logger = logging.getLogger("dispynb.deploy.base")

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


class Changes(_thread.RLock):  # type: ignore[misc]  # final in typeshed only
    """A launcher's lock (``_changed``), which also tells of changes to what it
    guards: the thread that changed the state calls `notify_all`, and
    `wait_unlocked` (`NodeLauncher.wait_for`) waits for that without the lock.

    Not a ``threading.Condition``, for the main thread's sake: a Ctrl-C landing
    as ``Condition.wait`` lets the lock go made the ``with`` around it raise
    ``RuntimeError('cannot release un-acquired lock')`` instead of the
    `KeyboardInterrupt`, and one landing in ``Condition.__enter__`` (Python code)
    just after it acquired the lock left the lock held for ever, the I/O thread
    hanging at the next registration. This lock's ``with`` is C code, and its
    waits are `Sleepers`'.
    """

    def __init__(self) -> None:
        super().__init__()
        #: How many times `notify_all` was called (changes told of).
        self.count = 0
        self._sleepers = Sleepers()

    def notify_all(self) -> None:
        """The state changed: wake the threads in `wait_unlocked`."""
        self.count += 1
        self._sleepers.wake_all()

    def wait_unlocked(self, seen: int, timeout: float) -> None:
        """Without the lock: sleep until a change after the ``seen``-th, or for
        ``timeout`` seconds (on the main thread, Ctrl-C ends it at once)."""
        self._sleepers.wait_for(lambda: self.count != seen, timeout)


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
    #: The address it was told to register with (``--register``): what it must
    #: reach, named when it did not register.
    register_to: str = ""


class _LauncherState(abc.ABC, Generic[Handle]):
    """A `NodeLauncher`'s state and what a launcher provides (its parts:
    `dispynb.deploy.scaling`, `scale` and `adapt`; `dispynb.deploy.registrations`,
    the nodes as they register and the clusters they go to)."""

    # Set by `NodeLauncher.__init__` (see there).
    secret: bytes
    register_host: str | None
    wait: float
    register_port: int
    events: collections.deque[ScaleEvent]
    _launched: list[Launched[Handle]]
    _subscribers: list[tuple[Subscriber, ScalableCluster | None]]
    _changed: Changes
    _scaling: threading.RLock
    _closed: bool
    _adaptive: Adaptive | None
    _stopping: set[asyncio.Task[None]]
    _known_cpus: int | None
    _runner: LoopRunner
    _registrar: Registrar

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

    def _starting(self, handle: Handle) -> str:
        """What to say of a launched node that runs but has not registered yet."""
        return "still starting"

    async def _register_to(self, index: int) -> str:
        """The address the ``index``-th node registers with (``register_host``, by
        default the loopback address; SSH finds the one routing to each host)."""
        return self.register_host or "127.0.0.1"

    @property
    def kind(self) -> str:
        """A short name for node names and logs (``'ssh'``, ``'slurm'``...)."""
        return type(self).__name__.lower()

    # -- its launched nodes ------------------------------------------------------------

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
                self._launched.append(Launched(name, handle, register_to=register_to))
            names.append(name)
        return names

    def _in_use(self) -> list[Launched[Handle]]:
        return [x for x in self._launched if not x.draining and not x.stopped]

    def _active(self) -> list[Launched[Handle]]:
        """Launched nodes neither draining, stopped nor ended (call with the lock)."""
        return [x for x in self._in_use() if self._reason(x) is None]

    def _reason(self, launched: Launched[Handle]) -> str | None:
        if launched.handle is None:
            return None
        return self._exit_reason(launched.handle)

    def _clusters(self) -> list[ScalableCluster]:
        with self._changed:
            return [c for _, c in self._subscribers if c is not None]

    def _event(self, action: str, node: str, detail: str) -> None:
        self.events.append(ScaleEvent(time.time(), action, node, detail))
        logger.info("%s: %s node %s (%s)", self.kind, action, node, detail)
