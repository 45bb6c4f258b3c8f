"""Slowloris on a shared scheduler's port: connections from many loopback addresses
that drip a byte of their hello now and then, each reopened as soon as it is closed,
while a user sets up her cluster and runs her jobs. A real scheduler process, real
nodes, the user's real `SharedJobCluster`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from dispynb.defaults import HANDSHAKE_TIMEOUT
from tests.hostile.test_scheduler import people, shared_nodes  # noqa: F401
from tests.hostile.tools import attacker_socket
from tests.jobs import wait_until

pytestmark = pytest.mark.slow

#: Loopback addresses the attacker connects from, and connections from each.
SOURCES = 12
PER_SOURCE = 8


def square(n: int) -> int:
    return n * n


class Drippers:
    """``SOURCES * PER_SOURCE`` connections dripping a byte every 0.5 s, each
    reopened once closed, until `stop`; how long each was held, how many at most
    at once, and how many have tried to connect (each once at least)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.held: list[float] = []  # seconds each closed one lasted
        self.open_now = self.most = self.tried = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._drip, args=(f"127.0.1.{n + 1}",))
            for n in range(SOURCES)
            for _ in range(PER_SOURCE)
        ]

    def __enter__(self) -> Drippers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _drip(self, source: str) -> None:
        first = True
        while not self._stop.is_set():
            try:
                sock = attacker_socket(self.port, source, timeout=1.0)
            except OSError:
                self._stop.wait(0.1)
                continue
            finally:
                if first:
                    first = False
                    with self._lock:
                        self.tried += 1
            opened = time.monotonic()
            with self._lock:
                self.open_now += 1
                self.most = max(self.most, self.open_now)
            try:
                while not self._stop.wait(0.5):
                    sock.sendall(b"\x00")  # a hello that never ends
                    try:
                        if sock.recv(1, 0x40) == b"":  # MSG_DONTWAIT: closed?
                            break
                    except BlockingIOError:
                        pass
            except OSError:
                pass  # closed by the scheduler
            finally:
                sock.close()
                with self._lock:
                    self.open_now -= 1
                    if not self._stop.is_set():
                        self.held.append(time.monotonic() - opened)


@pytest.mark.attack(
    id="sched-slowloris",
    title=f"Slowloris on a scheduler's port: {SOURCES * PER_SOURCE} connections from "
    f"{SOURCES} loopback addresses drip a byte of their hello every 0.5 s, each "
    "reopened once closed, while a user sets up her cluster and runs 4 jobs",
    goal="her cluster set up and its jobs done within 10 s; no dripping connection "
    f"held past the handshake deadline ({HANDSHAKE_TIMEOUT:.0f} s) and a second",
)
@pytest.mark.timeout(120)
def test_a_scheduler_serves_its_users_through_slowloris(
    tmp_path: Path,
    people: dict[str, Path],  # noqa: F811
    measure,
) -> None:
    with shared_nodes(tmp_path, people) as sched, Drippers(sched.port) as drippers:
        # Every dripper connected (or was refused) before she comes.
        wait_until(lambda: drippers.tried == SOURCES * PER_SOURCE)
        started = time.monotonic()
        with SharedJobCluster(
            square, scheduler_host=sched.address, secret_file=str(people["alice"])
        ) as cluster:
            results = [job() for job in [cluster.submit(n) for n in range(4)]]
        took = time.monotonic() - started
        time.sleep(HANDSHAKE_TIMEOUT + 1)  # a deadline's worth of reopened ones
    longest = max(drippers.held, default=0.0)
    measure(
        f"alice's results {results} in {took:.1f} s; {drippers.most} dripping "
        f"connections at once, {len(drippers.held)} closed, the longest held "
        f"{longest:.1f} s"
    )
    assert results == [0, 1, 4, 9]
    assert took < 10
    assert drippers.held and longest < HANDSHAKE_TIMEOUT + 1
