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

import asyncio
import collections
import logging
import re
import socket
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Self

from dispynb._loop import LoopRunner
from dispynb.deploy.adaptive import Adaptive, ScaleEvent
from dispynb.deploy.launcherstate import JOIN_GRACE as JOIN_GRACE
from dispynb.deploy.launcherstate import KEPT_EVENTS, Changes
from dispynb.deploy.launcherstate import REGISTER_WAIT as REGISTER_WAIT
from dispynb.deploy.launcherstate import Handle as Handle
from dispynb.deploy.launcherstate import Launched as Launched
from dispynb.deploy.launcherstate import Subscriber as Subscriber
from dispynb.deploy.registrations import _Registrations
from dispynb.deploy.registry import Registrar
from dispynb.errors import ConfigurationError
from dispynb.errors import LaunchError as LaunchError
from dispynb.secret import random_secret, resolve_secret

if TYPE_CHECKING:
    from dispynb.deploy.adaptive import ScalableCluster

#: What a launcher runs with the nodes' Python (``python -c NODE_MAIN ARGS``): it
#: becomes ``python -P -m nodeserver ARGS`` (the same process). ``-P`` keeps the
#: directory the node starts in (the login directory over SSH, sbatch's directory
#: on SLURM) off the front of its path, where ``-m`` alone puts it: a user's
#: ``dispynb.py`` or ``msgpack.py`` there was imported for ours, and the node died
#: at its start. A Python older than 3.11 (a lab machine's ``python3``) knows no
#: ``-P``: it says what it is instead of 'Unknown option'. (Code that Python 2
#: parses too; nothing it imports can be a user's file.)
NODE_MAIN = (
    "import os, sys; sys.version_info >= (3, 11) or sys.exit("
    '"dispynb-node needs Python 3.11 or later; %s is Python %s: give the '
    'launcher python= a newer one" % (sys.executable, sys.version.split()[0])); '
    'os.execv(sys.executable, [sys.executable, "-P", "-m", "nodeserver"]'
    " + sys.argv[1:])"
)
NODE_MODULE = ("-c", NODE_MAIN)

logger = logging.getLogger(__name__)


def route_address(host: str, port: int = 22) -> str:
    """The local address this machine would use to reach ``host`` (no packet sent).

    `ConfigurationError` if there is none, saying why and that ``register_host=``
    names the address instead (a host only ``ssh`` resolves, behind a jump host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, port))
        except OSError as exc:
            if isinstance(exc, socket.gaierror):
                what = f"cannot resolve {host!r} ({exc.strerror})"
            else:
                what = f"this machine has no route to {host!r} ({exc.strerror})"
            raise ConfigurationError(
                f"{what}, so it cannot tell at which of its addresses the nodes "
                f"there register: check the name, or give register_host= this "
                "machine's address that they reach (for a host that ssh reaches "
                "through a jump host, say)"
            ) from exc
        return str(sock.getsockname()[0])


#: A node's Python saying it lacks a module: ``python: No module named nodeserver``
#: (``-m``), or a ModuleNotFoundError's last line for a module dispynb imports.
_MISSING = re.compile(r"No module named '?(?P<name>[\w.]+)'?")


def missing_module_hint(output: str, python: str, where: str) -> str:
    """``": ... is not installed for PYTHON WHERE; ..."`` if a node's last ``output``
    says its Python lacks dispynb or a module it needs (the machine's default
    ``python3``, not the environment dispynb went into), else ``""``."""
    missing = _MISSING.search(output)
    if missing is None:
        return ""
    what = "dispynb" if missing["name"] == "nodeserver" else missing["name"]
    return (
        f": {what} is not installed for {python} {where}; install dispynb there, "
        "or give python= the Python that has it"
    )


class NodeLauncher(_Registrations[Handle]):
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
            resolved = random_secret().encode()
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
        self._changed = Changes()
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

    def start(self, count: int | None = None) -> None:
        """Launch ``count`` more nodes (default `default_count`); they register."""
        if self._closed:
            raise LaunchError("this launcher is closed")
        count = self.default_count if count is None else count
        for name in self._runner.run_sync(self._start, count):
            self._event("launch", name, "start")

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
                if not x.stopped and self._reason(x) is None:
                    self._event("stopped", x.name, "closed")
                x.stopped = True  # on purpose: not reported by exited()
        await asyncio.gather(
            *(self._stop(x.handle) for x in launched if x.handle is not None),
            *self._stopping,
            self._registrar.wait_closed(),
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


__all__ = [
    "LaunchError",
    "Launched",
    "NodeLauncher",
    "Subscriber",
    "missing_module_hint",
    "route_address",
]
