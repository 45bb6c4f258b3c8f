"""The toxic proxy (tests/toxic.py) does what each toxic says, timed on an echo."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.toxic import ToxicProxy, Toxics


class EchoServer:
    """A threaded loopback echo server that records when and how much it received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[float, int]] = []  # (monotonic time, bytes)
        self.closed = threading.Event()
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _echo(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                self.received.append((time.monotonic(), len(data)))
                conn.sendall(data)
        self.closed.set()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def connect(proxy: ToxicProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def round_trip(sock: socket.socket, payload: bytes) -> float:
    started = time.monotonic()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - started


def test_no_toxics_forwards_both_ways_and_propagates_close(echo):
    with ToxicProxy(echo.port) as proxy, connect(proxy) as sock:
        payload = bytes(range(256)) * 1000
        round_trip(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # EOF went through and came back
        assert echo.closed.wait(5)
    assert proxy.stats["up"].bytes == proxy.stats["down"].bytes == len(payload)
    assert proxy.connections == 1


def test_latency_delays_each_direction(echo):
    with (
        ToxicProxy(
            echo.port, upstream=Toxics(latency=0.2), downstream=Toxics(latency=0.1)
        ) as proxy,
        connect(proxy) as sock,
    ):
        elapsed = round_trip(sock, b"ping")
    assert 0.3 <= elapsed < 1.5, elapsed


def test_jitter_keeps_byte_order(echo):
    """100 small writes 10 ms apart with 300 +/- 200 ms: the stream arrives intact."""
    toxics = Toxics(latency=0.3, jitter=0.2)
    with ToxicProxy(echo.port, upstream=toxics) as proxy, connect(proxy) as sock:
        sent = b""
        started = time.monotonic()
        for n in range(100):
            piece = f"<{n}>".encode()
            sock.sendall(piece)
            sent += piece
            time.sleep(0.01)  # pacing: most writes become chunks of their own
        assert recv_exactly(sock, len(sent)) == sent
        elapsed = time.monotonic() - started
    first_arrival = echo.received[0][0] - started
    assert 0.1 <= first_arrival < 1.5, first_arrival
    assert elapsed >= 1.0 + 0.1  # the last write was held >= 100 ms too
    assert proxy.stats["up"].writes > 1


def test_jitter_spreads_delays_within_bounds():
    delays = [Toxics(latency=0.5, jitter=0.2).delay() for _ in range(1000)]
    assert all(0.3 <= d <= 0.7 for d in delays)
    assert max(delays) - min(delays) > 0.3
    assert Toxics(latency=0.5).delay() == 0.5


def test_slicer_writes_one_byte_at_a_time(echo):
    toxics = Toxics(slice_size=1, slice_pause=0.005)
    with ToxicProxy(echo.port, upstream=toxics) as proxy, connect(proxy) as sock:
        payload = b"0123456789" * 10
        elapsed = round_trip(sock, payload)
    assert proxy.stats["up"].writes == 100
    assert proxy.stats["up"].max_write == 1
    assert proxy.stats["down"].bytes == 100
    assert elapsed >= 99 * 0.005
    assert len(echo.received) > 10  # the node side saw many small reads


def test_rate_limits_bandwidth(echo):
    rate = 128 * 1024  # bytes/s
    with (
        ToxicProxy(echo.port, downstream=Toxics(rate=rate)) as proxy,
        connect(proxy) as sock,
    ):
        elapsed = round_trip(sock, b"x" * (64 * 1024))
    assert 0.45 <= elapsed < 3.0, elapsed  # 0.5 s at the limit
    assert proxy.stats["down"].max_write <= rate / 20


def test_blackhole_holds_bytes_without_closing_then_heals(echo):
    with ToxicProxy(echo.port) as proxy, connect(proxy) as sock:
        round_trip(sock, b"before")
        proxy.blackhole()
        sock.sendall(b"held")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert not echo.closed.is_set()
        sock.settimeout(10)
        proxy.heal()
        assert recv_exactly(sock, 4) == b"held"


def test_timed_blackhole_heals_by_itself(echo):
    with ToxicProxy(echo.port) as proxy, connect(proxy) as sock:
        proxy.blackhole(0.5)
        elapsed = round_trip(sock, b"late")
    assert 0.45 <= elapsed < 3.0, elapsed


def test_upstream_gone_closes_client_side(held_port):
    port = held_port()  # nothing listens there
    with ToxicProxy(port) as proxy, connect(proxy) as sock:
        assert sock.recv(1) == b""


def test_bad_toxics_are_refused_with_reason():
    with pytest.raises(ValueError, match="jitter <= latency"):
        Toxics(latency=0.1, jitter=0.2)
    with pytest.raises(ValueError, match="slice_size"):
        Toxics(slice_size=0)
    with pytest.raises(ValueError, match="rate"):
        Toxics(rate=0)
