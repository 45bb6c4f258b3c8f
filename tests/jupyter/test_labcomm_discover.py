"""The panel's discovery of nodes (`dispynb.jupyter.labcomm.discover`): by unicast
to a fake node on 127.0.0.1 only (a broadcast would leave this machine's
namespace), from a request of the panel, a bounded number at once."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from dispynb.errors import ConfigurationError
from dispynb.jupyter import labcomm
from dispynb.jupyter.labcomm import discover
from dispynb.protocol.discovery import Announce, Ping, decode, encode, new_boot_id


def test_discoveries_at_once_are_bounded(link_of: Any) -> None:
    """Each running discovery holds a thread and a socket: a flood of Discover
    requests gets errors past MAX_DISCOVERIES, not a thread each."""
    release = threading.Event()

    def slow(addresses: list[str]) -> list[dict[str, Any]]:
        release.wait(20)
        return []

    link, comm, _ = link_of(list, discoverer=slow)
    request = {"type": "request", "action": "discover", "addresses": []}
    count = labcomm.MAX_DISCOVERIES + 3
    try:
        for n in range(count):
            link.on_message({**request, "id": n})
        refused = [comm.reply(n) for n in range(labcomm.MAX_DISCOVERIES, count)]
        assert all("running already" in r["error"] for r in refused), refused
    finally:
        release.set()
    assert all(comm.reply(n)["ok"] for n in range(labcomm.MAX_DISCOVERIES))
    comm.wait_for(lambda d: d["type"] == "state" and not d["discovering"])
    link.on_message({**request, "id": count})
    assert comm.reply(count)["ok"]


class FakeNodeAnnouncer:
    """Answers discovery pings on 127.0.0.1 as a node server would."""

    def __init__(self, name: str = "fake-node", tcp_port: int = 51234) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.name, self.tcp_port = name, tcp_port
        self.pings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        boot = new_boot_id()
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            message = decode(data)
            if isinstance(message, Ping):
                self.pings += 1
                reply = Announce(
                    name=self.name,
                    port=self.tcp_port,
                    cpus=3,
                    boot=boot,
                    nonce=message.nonce,
                )
                self.sock.sendto(encode(reply), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def announcer() -> Iterator[FakeNodeAnnouncer]:
    node = FakeNodeAnnouncer()
    yield node
    node.close()


def test_discover_explicit_address(announcer: FakeNodeAnnouncer) -> None:
    found = discover([f"127.0.0.1:{announcer.port}"], timeout=0.5)
    assert found == [
        {"ip_addr": "127.0.0.1", "port": 51234, "name": "fake-node", "cpus": 3}
    ]
    assert announcer.pings == 1


def test_discover_runs_on_the_one_io_loop_also_from_a_running_loop(
    announcer: FakeNodeAnnouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The panel's discovery pings from dispynb's I/O loop thread, never from a
    loop of its own, so it also works when called under a running loop (a
    notebook cell), where asyncio.run refuses to start."""
    import asyncio

    from dispynb.transport.discovery import Discovery

    threads: list[str] = []
    start = Discovery.start

    async def recording_start(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return await start(self, *args, **kwargs)

    monkeypatch.setattr(Discovery, "start", recording_start)

    async def cell() -> list[dict[str, object]]:
        return discover([f"127.0.0.1:{announcer.port}"], timeout=0.3)

    found = asyncio.run(cell())
    assert [node["name"] for node in found] == ["fake-node"]
    assert threads == ["dispynb-io"]


def test_discover_rejects_bad_addresses_before_sending() -> None:
    with pytest.raises(ConfigurationError, match="is not an IP"):
        discover(["127.0.0.1:1", "no-such-host"], timeout=0.1)
    with pytest.raises(ConfigurationError, match="at most 256"):
        discover(["127.0.0.1"] * 300, timeout=0.1)


def test_discover_request_replies_and_updates_state(
    announcer: FakeNodeAnnouncer, link_of: Any
) -> None:
    link, comm, _ = link_of(
        list, discoverer=lambda addresses: discover(addresses, timeout=0.3)
    )
    link.on_message(
        {
            "type": "request",
            "id": 9,
            "action": "discover",
            "addresses": [f"127.0.0.1:{announcer.port}"],
        }
    )
    comm.wait_for(lambda d: d["type"] == "state" and d["discovering"])
    reply = comm.reply(9)
    assert reply["ok"] and reply["result"][0]["name"] == "fake-node"
    state = comm.wait_for(
        lambda d: d["type"] == "state" and d["discovered"] and not d["discovering"]
    )
    assert state["discovered"] == reply["result"]
    link.on_message(
        {"type": "request", "id": 10, "action": "discover", "addresses": ["nohost"]}
    )
    assert "discovery failed" in comm.reply(10)["error"]
