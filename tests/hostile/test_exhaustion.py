"""Attacks that exhaust a node's connection resources: descriptors, handshake slots.

Each runs a real ``dispynb-node`` (under ``prlimit`` where descriptors matter) and real
attacker sockets from their own loopback addresses (127.0.0.x), bounded in time.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dispynb import JobCluster
from dispynb.errors import NodeBusyError
from tests import jobs
from tests.hostile.tools import (
    RawSession,
    count_lines,
    cpu_percent,
    limited_node,
    wait_for,
)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def descriptors(count: int) -> Iterator[None]:
    """This process may open ``count`` descriptors (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count), max(hard, count)))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_sessions(port: int, secret: str, count: int) -> list[RawSession]:
    """``count`` authenticated sessions from 127.0.0.1 (retrying busy refusals)."""
    sessions: list[RawSession] = []
    deadline = time.monotonic() + 60
    while len(sessions) < count:
        try:
            sessions.append(RawSession.open(port, secret))
        except NodeBusyError:
            assert time.monotonic() < deadline, "node stayed busy"
            time.sleep(0.05)
    return sessions


def hold_connections(port: int, count: int, sources: int) -> list[socket.socket]:
    """``count`` connections started (non-blocking) from ``sources`` addresses."""
    held = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((f"127.0.0.{2 + i % sources}", 0))
        code = sock.connect_ex(("127.0.0.1", port))
        assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)
        held.append(sock)
    return held


def until_served(port: int, secret: str, timeout: float = 20) -> float:
    """Seconds until a new client gets an authenticated session."""
    start = time.monotonic()
    while True:
        try:
            RawSession.open(port, secret, timeout=2).close()
            return time.monotonic() - start
        except (OSError, NodeBusyError):
            assert time.monotonic() - start < timeout, "the node did not come back"
            time.sleep(0.05)


@pytest.mark.timeout(120)
@pytest.mark.attack(
    id="fd-exhaustion",
    title="A node at its descriptor limit (prlimit --nofile=256, 200 sessions open) "
    "while 1,000 connections are held for 10 s",
    goal="node CPU under 5%, at most 2 lines about accepting, service back when "
    "the connections close",
)
def test_descriptor_exhaustion_backs_off(measure, tmp_path):
    with descriptors(4096), limited_node(tmp_path / "node", nofile=256) as node:
        sessions = open_sessions(node.port, node.secret, 200)
        try:
            held = hold_connections(node.port, 1000, sources=100)
            try:
                # Until the node runs out: the log says it paused accepting.
                wait_for(lambda: "pausing" in node.log_text(), "node out of fds")
                cpu = cpu_percent(node.proc.pid, window=10)
            finally:
                for sock in held:
                    sock.close()
            back = until_served(node.port, node.secret)
        finally:
            for session in sessions:
                session.close()
        wait_for(
            lambda: "accepting connections again" in node.log_text(), "episode end"
        )
    accept_lines = count_lines(node.log, "accept")
    all_lines = count_lines(node.log)
    measure(
        f"node CPU {cpu:.1f}% over 10 s, {accept_lines} lines about accepting "
        f"({all_lines} log lines in all), service back {back:.1f} s after the "
        "connections closed"
    )
    assert cpu < 5
    # One exhaustion, one pause line and one line when it ends: lulls while the
    # holders are slow to connect (a loaded machine) do not end it (EPISODE_QUIET).
    assert accept_lines <= 2
    assert back < 10


class Reopener(threading.Thread):
    """Holds ``count`` idle connections from ``source``, reopening each one as it is
    cut (refused, timed out), until stopped."""

    def __init__(self, port: int, count: int, source: str = "127.0.0.2") -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.source = port, count, source
        self.reopened = 0
        self._stop_event = threading.Event()

    def _open(self, selector: selectors.BaseSelector) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((self.source, 0))
        sock.connect_ex(("127.0.0.1", self.port))
        selector.register(sock, selectors.EVENT_READ)

    def run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for _ in range(self.count):
                self._open(selector)
            while not self._stop_event.is_set():
                for key, _ in selector.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    selector.unregister(sock)
                    sock.close()  # whatever it said (busy) or did (closed)
                    self._open(selector)
                    self.reopened += 1
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


@pytest.mark.timeout(120)
@pytest.mark.attack(
    id="pending-lockout",
    title="One peer holds 200 idle connections and reopens each one as it is cut",
    goal="other clients get in: a new JobCluster runs a job, 50 of 50 connections "
    "made every 0.2 s succeed",
)
def test_one_peer_cannot_lock_out_the_others(measure, tmp_path):
    with limited_node(tmp_path / "node") as node:
        attacker = Reopener(node.port, 200)
        attacker.start()
        try:
            wait_for(lambda: attacker.reopened > 200, "attacker's connections cut")
            start = time.monotonic()
            with JobCluster(
                jobs.square, nodes=[node.spec], secret=node.secret
            ) as cluster:
                assert cluster.submit(7)() == 49
            cluster_time = time.monotonic() - start
            served = 0
            for _ in range(50):
                with contextlib.suppress(OSError, NodeBusyError):
                    RawSession.open(node.port, node.secret).close()
                    served += 1
                time.sleep(0.2)
        finally:
            attacker.stop()
        reopened = attacker.reopened
    measure(
        f"JobCluster ran a job in {cluster_time:.1f} s; {served} of 50 connections "
        f"served while the attacker's were cut and reopened {reopened} times"
    )
    assert served == 50


def served_within(port: int, secret: str, retry_for: float) -> bool:
    """Whether a client retrying busy or cut handshakes for ``retry_for`` seconds
    (as dispynb's clients do) gets an authenticated session."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            RawSession.open(port, secret, timeout=2).close()
            return True
        except (OSError, NodeBusyError):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


SOURCES = 40


@pytest.mark.timeout(240)
@pytest.mark.attack(
    id="handshake-slot-crowding",
    title=f"Peers on {SOURCES} addresses hold 8 idle connections each (every handshake "
    "slot), reopening each one as it is cut",
    goal="a new JobCluster runs a job, 10 of 10 clients retrying as dispynb's do get "
    "in (was: refused as busy until they gave up)",
)
def test_peers_on_many_addresses_cannot_hold_every_handshake_slot(measure, tmp_path):
    with limited_node(tmp_path / "node") as node:
        attackers = [
            Reopener(node.port, 8, f"127.0.0.{10 + i}") for i in range(SOURCES)
        ]
        for attacker in attackers:
            attacker.start()
        try:
            # Every slot held, sources throttled and reopening: steady state.
            wait_for(
                lambda: sum(a.reopened for a in attackers) > 8 * SOURCES,
                "attackers' connections cut",
                timeout=60,
            )
            start = time.monotonic()
            try:
                with JobCluster(
                    jobs.square, nodes=[node.spec], secret=node.secret
                ) as cluster:
                    result = cluster.submit(7)()
                ran = f"ran a job in {time.monotonic() - start:.1f} s: {result}"
            except Exception as exc:  # what the user saw
                ran = f"failed after {time.monotonic() - start:.1f} s: {exc}"[:160]
            served = sum(served_within(node.port, node.secret, 10) for _ in range(10))
        finally:
            for attacker in attackers:
                attacker.stop()
        reopened = sum(a.reopened for a in attackers)
    measure(
        f"JobCluster {ran}; {served} of 10 clients got in; the attackers' "
        f"connections were cut and reopened {reopened} times"
    )
    assert ran.endswith(": 49")
    assert served == 10
