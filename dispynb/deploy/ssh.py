"""`SSHNodes`: node servers started over SSH on the user's machines.

Each host gets one ``dispynb-node`` (all its CPUs unless ``node_args`` say otherwise),
started by the OpenSSH client (``ssh``) as an asyncio subprocess. Why OpenSSH rather
than a Python SSH library: it is what users already configured (``~/.ssh/config``
aliases, jump hosts, agents, hardware keys, ``known_hosts``), it needs no new
dependency, and host keys are checked the way the user expects (``BatchMode=yes``:
never a prompt, a host it does not know fails clearly).

The secret goes over the SSH session's standard input (``--secret-stdin``), never on
a command line or in a file. That standard input then stays open: the node watches it
(``--parent-pipe 0``) and stops when it closes, which happens when `close` closes it,
and when this process dies, whatever kills it (the kernel closes the pipe, ``ssh``
sends EOF, the node stops). ``ssh`` runs in its own session, so a notebook interrupt
(JupyterLab signals the kernel's process group) does not stop the nodes.

The nodes' output (their log) is logged here under ``dispynb.deploy.ssh`` (INFO),
each line prefixed with the node's name.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shlex
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from dispynb._interruptible import unblock_in_child
from dispynb.deploy.base import (
    NODE_MODULE,
    REGISTER_WAIT,
    LaunchError,
    NodeLauncher,
    missing_module_hint,
    route_address,
)
from dispynb.deploy.registry import RegisteredNode
from dispynb.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: Seconds a node gets to stop after its standard input closed, before ``ssh`` is
#: terminated (which closes the session: the node then stops too).
STOP_WAIT = 15.0
#: Lines of a node's output kept to explain why it ended.
KEPT_LINES = 8
#: Seconds ``ssh`` may take to connect (``ConnectTimeout``), unless the user's ssh
#: configuration sets it: without one a host that does not answer takes the
#: system's TCP timeout (over 2 minutes), beyond `REGISTER_WAIT`.
CONNECT_TIMEOUT = 30.0

#: ``ssh`` starts with no signal blocked (the I/O thread that starts it blocks some).
_CHILD: dict[str, Any] = (
    {"preexec_fn": unblock_in_child} if hasattr(signal, "pthread_sigmask") else {}
)


class SSHNode:
    """One ``ssh`` process running a node server on ``host``."""

    def __init__(self, host: str, name: str, proc: asyncio.subprocess.Process) -> None:
        self.host = host
        self.name = name
        self.proc = proc
        self.last_lines: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
        self.reader: asyncio.Task[None] | None = None
        #: The node registered: stopping it waits for it to drain.
        self.registered = False

    async def log_output(self) -> None:
        """Log each line the node (and ``ssh``) print, until they end."""
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.last_lines.append(text)
            # Not name@host: the host may be user@host already.
            logger.info("[%s on %s] %s", self.name, self.host, text)


class SSHNodes(NodeLauncher[SSHNode]):
    """Node servers on ``hosts``, started over SSH; use as ``JobCluster(nodes=...)``.

    Parameters
    ----------
    hosts:
        ``ssh`` destinations (``'host'``, ``'user@host'`` or a ``~/.ssh/config``
        alias); one node each (repeat a host for more).
    python:
        The Python that runs ``-m nodeserver`` on the hosts (dispynb installed).
    node_args:
        More ``dispynb-node`` options (``['--cpus', '4']``...).
    env:
        Environment variables for the node on the hosts (``PYTHONPATH``...).
    ssh_options:
        More ``ssh`` options (``['-F', 'config']``, ``['-p', '2222']``...).
    ssh:
        The ``ssh`` command.
    secret, register_host, register_port, wait:
        See `NodeLauncher`; by default each host is told the local address that
        routes to it (as ``ssh -G`` resolves its name).
    start:
        Start the nodes now (else call `start`).

    Examples
    --------
    >>> with SSHNodes(["node1", "node2"]) as nodes:  # doctest: +SKIP
    ...     cluster = JobCluster(compute, nodes=nodes)
    """

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        python: str = "python3",
        node_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ssh_options: Sequence[str] = (),
        ssh: str = "ssh",
        secret: str | bytes | None = None,
        register_host: str | None = None,
        register_port: int = 0,
        wait: float = REGISTER_WAIT,
        start: bool = True,
    ) -> None:
        if isinstance(hosts, str):
            hosts = [hosts]
        if not hosts:
            raise ConfigurationError("SSHNodes needs at least one host")
        for host in hosts:
            if not host or host.startswith("-") or any(c.isspace() for c in host):
                raise ConfigurationError(f"not an ssh destination: {host!r}")
        for key in env or {}:
            if not key.isidentifier():
                raise ConfigurationError(f"not an environment variable name: {key!r}")
        self.hosts = list(hosts)
        self.python = python
        self.node_args = list(node_args)
        self.env = dict(env or {})
        self.ssh_options = list(ssh_options)
        self.ssh = ssh
        self._host_of: dict[int, str] = {}
        self._configs: dict[str, dict[str, str]] = {}
        super().__init__(
            secret=secret,
            register_host=register_host,
            register_port=register_port,
            wait=wait,
        )
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def default_count(self) -> int:
        return len(self.hosts)

    @property
    def kind(self) -> str:
        return "ssh"

    def remote_command(self, name: str, register_to: str) -> str:
        """The shell command run on a host (it holds no secret)."""
        argv = [
            self.python,
            *NODE_MODULE,
            "--secret-stdin",
            "--parent-pipe",
            "0",
            "--register",
            register_to,
            "--name",
            name,
            "--port",
            "0",
            "--no-discovery",
            *self.node_args,
        ]
        if self.env:
            argv = ["env", *(f"{k}={v}" for k, v in self.env.items()), *argv]
        return shlex.join(argv)

    async def _exec(self, *argv: str, **options: Any) -> asyncio.subprocess.Process:
        """Start ``ssh``; `LaunchError` saying what to do if it cannot be run."""
        try:
            return await asyncio.create_subprocess_exec(*argv, **options)
        except OSError as exc:
            raise LaunchError(
                f"cannot run {self.ssh!r}: {exc.strerror} (install the OpenSSH "
                "client, or give ssh= the command's path)"
            ) from exc

    async def _ssh_config(self, host: str) -> dict[str, str]:
        """``host``'s ssh configuration as ``ssh -G`` resolves it (aliases,
        ``Hostname``, ``ssh_options``...): option names in lower case."""
        if host in self._configs:
            return self._configs[host]
        proc = await self._exec(
            self.ssh,
            *self.ssh_options,
            "-G",
            "--",
            host,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            **_CHILD,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise LaunchError(
                f"ssh -G {host} failed: {err.decode(errors='replace').strip()}"
            )
        config: dict[str, str] = {}
        for line in out.decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            config.setdefault(key.lower(), value.strip())
        self._configs[host] = config
        return config

    async def _ssh_hostname(self, host: str) -> str:
        """``host``'s address as ``ssh -G`` resolves it (aliases, ``Hostname``)."""
        config = await self._ssh_config(host)
        return config.get("hostname") or host.rpartition("@")[2]

    async def _connect_timeout(self, host: str) -> list[str]:
        """``-o ConnectTimeout=...`` unless the user's configuration sets one (or
        ``ssh -G`` does not work: an old OpenSSH, a stand-in for ``ssh``)."""
        try:
            config = await self._ssh_config(host)
        except (LaunchError, OSError):
            return []
        if config.get("connecttimeout", "none") != "none":
            return []
        return ["-o", f"ConnectTimeout={CONNECT_TIMEOUT:g}"]

    def _host_for(self, index: int) -> str:
        """The host of the ``index``-th node: the one running the fewest nodes now
        for the times it is listed in ``hosts`` (the first on a tie), so nodes that
        `scale` or `adapt` add after some were stopped spread over the hosts."""
        if index not in self._host_of:
            with self._changed:
                running = [
                    x.handle.host
                    for x in self._in_use()
                    if x.handle is not None and self._reason(x) is None
                ]
            self._host_of[index] = min(
                self.hosts, key=lambda h: running.count(h) / self.hosts.count(h)
            )
        return self._host_of[index]

    async def _register_to(self, index: int) -> str:
        if self.register_host and self.register_host not in ("0.0.0.0", "::"):
            return self.register_host
        hostname = await self._ssh_hostname(self._host_for(index))
        return await asyncio.get_running_loop().run_in_executor(
            None, route_address, hostname
        )

    async def _launch(self, index: int, name: str, register_to: str) -> SSHNode:
        host = self._host_for(index)
        command = self.remote_command(name, register_to)
        argv = [
            self.ssh,
            "-T",
            "-o",
            "BatchMode=yes",
            *self.ssh_options,
            *await self._connect_timeout(host),
            "--",
            host,
            command,
        ]
        logger.info("starting node %s on %s: %s", name, host, command)
        proc = await self._exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a notebook interrupt must not reach ssh
            **_CHILD,
        )
        node = SSHNode(host, name, proc)
        node.reader = asyncio.get_running_loop().create_task(node.log_output())
        assert proc.stdin is not None
        proc.stdin.write(self.secret + b"\n")
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        return node

    def _registered(self, node: RegisteredNode) -> None:
        with self._changed:
            launched = next((x for x in self._launched if x.name == node.name), None)
        if launched is not None and launched.handle is not None:
            launched.handle.registered = True
        super()._registered(node)

    async def _stop(self, handle: SSHNode) -> None:
        proc = handle.proc
        if proc.stdin is not None and not proc.stdin.is_closing():
            # The node's --parent-pipe 0 ends: it stops, saying its launcher closed
            # it (nodeserver.lifeline.CLOSING first), not that its parent died.
            proc.stdin.write(b"stop\n")
            proc.stdin.close()
        # A node that never registered has no job to drain, and its ssh may still
        # be connecting to a host that does not answer (2 min without
        # ConnectTimeout): end ssh now; a node it started sees its stdin close.
        wait = STOP_WAIT if handle.registered else 0.0
        try:
            await asyncio.wait_for(proc.wait(), wait)
        except TimeoutError:
            if handle.registered:
                logger.warning(
                    "node %s on %s did not stop within %g s of its stdin closing; "
                    "ending ssh",
                    handle.name,
                    handle.host,
                    STOP_WAIT,
                )
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if handle.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(handle.reader, 5.0)

    def _starting(self, handle: SSHNode) -> str:
        if handle.last_lines:
            return f"still starting on {handle.host}: {handle.last_lines[-1]}"
        return f"still starting on {handle.host}: no output yet (ssh connecting?)"

    def _exit_reason(self, handle: SSHNode) -> str | None:
        code = handle.proc.returncode
        if code is None:
            return None
        last = " | ".join(handle.last_lines) or "no output"
        hint = ""
        if code == 255:  # ssh's own failure: connection, authentication, host key
            hint = (
                f": ssh itself failed; check that `ssh {shlex.join(self.ssh_options)}"
                f"{' ' if self.ssh_options else ''}{handle.host} true` works here "
                "without a prompt (keys or an agent, a known host key)"
            )
        else:
            hint = missing_module_hint(last, self.python, f"on {handle.host}")
        return f"ssh to {handle.host} exited with status {code} ({last}){hint}"
