"""A few "hosts" on one Ethernet segment, made of Linux network namespaces.

Every host is a namespace ``<prefix>-h<i>`` holding one veth (``veth0``, address
``10.77.0.<i>/24``); the other ends of the veths are ports of a bridge that lives in its
own namespace ``<prefix>-br``. Nothing is added to the machine's own namespace, so
broadcasts, multicasts and link cuts stay inside the namespaces a test created.

The prefix is ``dnb<pid>-<random>``: unique per run, and recognisably ours, so that
`sweep_stale` can delete namespaces left by a run whose process is gone (killed before
its cleanup) without ever touching anyone else's.

Processes are started in a host with ``ip netns exec``, which execs the command in
place: the `subprocess.Popen` pid is the program's own pid, so signals reach it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispynb.secret import random_secret
from tests.nodeproc import node_env, write_secret_file

#: Addresses of the hosts: ``10.77.0.1`` ... (the broadcast address is ``.255``).
SUBNET = "10.77.0"
BROADCAST = f"{SUBNET}.255"

#: Seconds a node gets to start listening, and to stop after SIGTERM.
NODE_WAIT = 20.0

_IP = shutil.which("ip") or "/usr/sbin/ip"
_UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
_OURS = re.compile(r"dnb(\d+)-[0-9a-f]{6}-(?:br|h\d+)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_IP, *args], capture_output=True, text=True, timeout=20, check=check
    )


@functools.cache
def unavailable_reason() -> str | None:
    """Why namespace hosts cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "multi-host tests create network namespaces: run them as root"
    if shutil.which("ip") is None:
        return "multi-host tests need iproute2's `ip` command"
    probe = f"dnb{os.getpid()}-{secrets.token_hex(3)}-br"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` is not available: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def has_iptables() -> bool:
    return shutil.which("iptables") is not None


def namespaces() -> list[str]:
    """Names of the network namespaces that exist."""
    listing = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Delete namespaces of earlier runs whose process is gone; return their names.

    What still runs inside them was started by that run (nodes, clients): killed.
    """
    removed = []
    for name in namespaces():
        match = _OURS.fullmatch(name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        if not Path(f"/proc/{match.group(1)}").exists():
            _kill_inside(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@contextlib.contextmanager
def hosts_or_skip(count: int) -> Iterator[Network]:
    """``count`` hosts on one bridge for a test module, made afresh (after
    `sweep_stale`) and always destroyed; where namespaces cannot be made, the tests
    are skipped, saying why."""
    import pytest  # (bench/crosshost.py uses this module outside pytest)

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    sweep_stale()
    with Network(count).running() as network:
        yield network


def _kill_inside(netns: str) -> None:
    for pid in _ip("netns", "pids", netns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@dataclass
class Host:
    """One namespace host."""

    index: int
    netns: str
    ip: str
    #: The bridge-side end of this host's veth (a port of ``br0``).
    port: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host."""
        return [_IP, "netns", "exec", self.netns, *argv]


@dataclass
class Network:
    """Hosts ``h1`` ... ``hN`` on one bridge; `create` makes them, `destroy` ends all.

    Examples
    --------
    >>> with Network(4).running() as net:  # doctest: +SKIP
    ...     net.hosts[0].ip
    '10.77.0.1'
    """

    size: int = 4
    prefix: str = field(
        default_factory=lambda: f"dnb{os.getpid()}-{secrets.token_hex(3)}"
    )
    hosts: list[Host] = field(default_factory=list)
    #: Seconds `create` took.
    setup_seconds: float = 0.0
    _made: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    def create(self) -> None:
        """Make the bridge namespace and the hosts (cleaned up by `destroy`)."""
        start = time.monotonic()
        self._add_netns(self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        _ip("-n", self.bridge, "link", "set", "lo", "up")
        for index in range(1, self.size + 1):
            host = Host(
                index, f"{self.prefix}-h{index}", f"{SUBNET}.{index}", f"vh{index}"
            )
            self._add_netns(host.netns)
            # both ends created directly inside the namespaces
            _ip(
                "link", "add", "veth0", "netns", host.netns,
                "type", "veth", "peer", "name", host.port, "netns", self.bridge,
            )  # fmt: skip
            _ip("-n", self.bridge, "link", "set", host.port, "master", "br0")
            _ip("-n", self.bridge, "link", "set", host.port, "up")
            _ip(
                "-n", host.netns, "addr", "add", f"{host.ip}/24",
                "brd", BROADCAST, "dev", "veth0",
            )  # fmt: skip
            _ip("-n", host.netns, "link", "set", "veth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            self.hosts.append(host)
        self.setup_seconds = time.monotonic() - start

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def destroy(self) -> None:
        """Kill what still runs in this network's namespaces, then delete them."""
        for name in self._made:
            _kill_inside(name)  # started by this test run, in namespaces it made
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()
        self.hosts.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[Network]:
        """`create`, then `destroy` whatever happens."""
        try:
            self.create()
            yield self
        finally:
            self.destroy()

    # -- links -----------------------------------------------------------------------

    def cut(self, host: Host) -> None:
        """Unplug ``host``: its bridge port goes down, its packets are lost silently."""
        _ip("-n", self.bridge, "link", "set", host.port, "down")

    def heal(self, host: Host) -> None:
        """Plug ``host`` back in."""
        _ip("-n", self.bridge, "link", "set", host.port, "up")

    def ip(self, host: Host, *args: str, check: bool = True) -> str:
        """Run ``ip -n <host> args`` (an extra address, a route) and return stdout."""
        return _ip("-n", host.netns, *args, check=check).stdout

    # -- processes -------------------------------------------------------------------

    def popen(
        self, host: Host, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host`` (environment: `node_env`, repo importable)."""
        kwargs.setdefault("env", node_env())
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(host.command(argv), **kwargs)

    def run(
        self, host: Host, argv: Sequence[str], timeout: float = 30, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` to completion (killed after ``timeout``);
        ``kwargs`` go to `subprocess.run` (default environment: `node_env`)."""
        kwargs.setdefault("env", node_env())
        return subprocess.run(
            host.command(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )


# -- node servers ----------------------------------------------------------------------


@dataclass
class NetNode:
    """A ``python -m nodeserver`` process in a namespace host."""

    host: Host
    proc: subprocess.Popen[bytes]
    port: int
    name: str
    log: Path
    #: Seconds from spawn until it listened.
    start_seconds: float
    #: CPUs it serves.
    cpus: int = 0

    @property
    def spec(self) -> str:
        return f"{self.host.ip}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9 the node server (its jobs' processes die with it)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(NODE_WAIT)

    def pause(self) -> None:
        """SIGSTOP: the node hangs with its sockets open."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """End the node and everything in its process group; never raises."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(NODE_WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # its computation processes, if any outlived it (same process group)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def node_program() -> list[str]:
    """The ``dispynb-node`` console script next to this Python, as users start it
    (``python -m nodeserver`` if it is not installed there)."""
    script = Path(sys.executable).with_name("dispynb-node")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "nodeserver"]


#: The node's "serving" log line: its CPUs and the addresses it listens on.
SERVING = re.compile(r"serving (\d+) CPUs? on (\S+?)(?:,| |$)", re.MULTILINE)


def start_node(
    net: Network,
    host: Host,
    directory: Path,
    secret: str | None,
    *args: str,
    name: str | None = None,
    cpus: int | None = None,
    wait: bool = True,
) -> NetNode:
    """Start ``dispynb-node`` on ``host`` as dispynode is started; wait till it listens.

    Default flags only: the secret is in ``DISPYNB_SECRET``, and ``args`` (plus
    ``--cpus`` if ``cpus`` is given) are the only options. As on a machine of its own,
    the node has a host name (``name``, default ``node-h<i>``: a UTS namespace) and a
    temporary directory (``TMPDIR``, so its default destination path is its own).
    """
    name = name or f"node-h{host.index}"
    directory = directory / name
    (directory / "tmp").mkdir(parents=True, exist_ok=True)
    log = directory / "node.log"
    argv = [
        _UNSHARE, "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name,
        *node_program(),
        *(["--cpus", str(cpus)] if cpus is not None else []),
        *args,
    ]  # fmt: skip
    env = node_env()
    env["TMPDIR"] = str(directory / "tmp")
    if secret is not None:
        env["DISPYNB_SECRET"] = secret
    start = time.monotonic()
    with open(log, "wb") as handle:
        proc = net.popen(
            host,
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    node = NetNode(host, proc, 0, name, log, 0.0)
    if wait:
        wait_node(node, start)
    return node


def wait_node(node: NetNode, start: float) -> None:
    """Wait for a node's "serving" log line (bounded); fill in its port and CPUs."""
    deadline = start + NODE_WAIT
    while (match := SERVING.search(node.log_text())) is None:
        if node.proc.poll() is not None:
            status = node.proc.returncode
            raise AssertionError(
                f"node {node.name} exited with {status}:\n{node.log_text()}"
            )
        if time.monotonic() > deadline:
            node.stop()
            raise AssertionError(f"node {node.name} did not listen in {NODE_WAIT} s")
        time.sleep(0.01)
    node.port = int(match.group(2).rsplit(":", 1)[1])
    node.cpus = int(match.group(1))
    node.start_seconds = time.monotonic() - start


def new_secret_file(directory: Path) -> tuple[str, Path]:
    """A fresh random secret (256 bits) and its 0600 file."""
    secret = random_secret()
    return secret, write_secret_file(directory / "secret", secret)


# -- client programs ---------------------------------------------------------------

_CLIENT_MAIN = """

if __name__ == "__main__":
    import json as _json
    import sys as _sys

    _result = main(_json.loads(_sys.argv[1]))
    print("RESULT " + _json.dumps(_result), flush=True)
"""


@dataclass
class Client:
    """A client program running in a namespace host (see `start_client`)."""

    proc: subprocess.Popen[str]
    script: Path
    #: Its standard error, once `result` has returned.
    stderr: str = ""

    def result(self, timeout: float = 60) -> Any:
        """Wait for the program; return what its ``main`` returned (JSON)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(
                f"client {self.script.name} still running after {timeout} s:\n{err}"
            ) from None
        self.stderr = err
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if self.proc.returncode != 0 or not lines:
            raise AssertionError(
                f"client {self.script.name} failed ({self.proc.returncode}):\n"
                f"{out}\n{err}"
            )
        return json.loads(lines[-1].removeprefix("RESULT "))

    def log_times(self, text: str) -> list[float]:
        """Times of the log lines (``%(created)f`` first) that contain ``text``."""
        times = []
        for line in self.stderr.splitlines():
            stamp, _, rest = line.partition(" ")
            if text in rest:
                with contextlib.suppress(ValueError):
                    times.append(float(stamp))
        return times

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def start_client(
    net: Network,
    host: Host,
    directory: Path,
    code: str,
    args: dict[str, Any],
    secret: str | None = None,
) -> Client:
    """Run ``code`` (defining ``main(args) -> JSON-able``) as a program in ``host``;
    ``secret`` goes into its ``DISPYNB_SECRET``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / f"client-{secrets.token_hex(3)}.py"
    script.write_text(code + _CLIENT_MAIN)
    env = node_env()
    if secret is not None:
        env["DISPYNB_SECRET"] = secret
    proc = net.popen(
        host,
        [sys.executable, str(script), json.dumps(args)],
        cwd=directory,  # not the checkout: a killed client leaves its recovery file
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    return Client(proc, script)  # type: ignore[arg-type]


def run_client(
    net: Network,
    host: Host,
    directory: Path,
    code: str,
    args: dict[str, Any],
    timeout: float = 60,
    secret: str | None = None,
) -> Any:
    """`start_client` and wait for its result."""
    client = start_client(net, host, directory, code, args, secret)
    try:
        return client.result(timeout)
    finally:
        client.stop()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate()`` every 10 ms until true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)
