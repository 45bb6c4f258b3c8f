"""The daily service window (``--service_start/--service_stop/--service_end``)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
from pathlib import Path

import pytest

from dispynb.errors import ConfigurationError
from nodeserver import service
from nodeserver.config import NodeConfig
from nodeserver.server import NodeServer
from nodeserver.service import Phase, ServiceWindow, keep_window, parse_time
from tests.asyncutil import run

at = datetime.time
DAY = datetime.date(2026, 3, 1)


def moment(hour: int, minute: int = 0, days: int = 0) -> datetime.datetime:
    return datetime.datetime.combine(
        DAY + datetime.timedelta(days=days), at(hour, minute)
    )


@pytest.mark.parametrize(
    ("now", "phase", "until"),
    [
        (moment(7, 59), Phase.ENDED, moment(8)),
        (moment(8), Phase.SERVING, moment(17)),
        (moment(16, 59), Phase.SERVING, moment(17)),
        (moment(17, 30), Phase.STOPPED, moment(18)),
        (moment(23), Phase.ENDED, moment(8, days=1)),
    ],
)
def test_day_window(now: datetime.datetime, phase: Phase, until: object) -> None:
    window = ServiceWindow(at(8), at(17), at(18))
    assert window.phase_at(now) == (phase, until)


def test_window_across_midnight_and_without_start() -> None:
    night = ServiceWindow(at(20), None, at(6))
    assert night.phase_at(moment(23)) == (Phase.SERVING, moment(6, days=1))
    assert night.phase_at(moment(3)) == (Phase.SERVING, moment(6))
    assert night.phase_at(moment(12)) == (Phase.ENDED, moment(20))
    # No start: from midnight.
    morning = ServiceWindow(None, at(12), None)
    assert morning.phase_at(moment(9)) == (Phase.SERVING, moment(12))
    assert morning.phase_at(moment(13)) == (Phase.STOPPED, moment(0, days=1))
    # Equal stop and end: end wins.
    both = ServiceWindow(at(8), at(17), at(17))
    assert both.phase_at(moment(17))[0] is Phase.ENDED


def test_window_needs_a_closing_time_and_times_parse() -> None:
    with pytest.raises(ConfigurationError, match="needs --service_stop"):
        ServiceWindow(at(8))
    assert parse_time(" 07:05 ") == at(7, 5)
    for bad in ("7", "24:00", "07:60", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="use HH:MM"):
            parse_time(bad)


def test_keep_window_opens_and_closes_a_running_node(tmp_path: Path) -> None:
    """Driven by a clock: STOPPED closes the port (and discovery), SERVING reopens it
    on the same port."""
    window = ServiceWindow(at(8), at(17), at(18))
    clock = [moment(12)]

    def port_open(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            return False
        return True

    async def until(predicate: object, what: str) -> None:
        async with asyncio.timeout(10):
            while not predicate():  # type: ignore[operator]
                await asyncio.sleep(0.01)

    async def main() -> None:
        server = NodeServer(
            NodeConfig(
                port=0,
                secret=b"service-window-test-secret-0123456789",
                dest_path=str(tmp_path / "dest"),
            )
        )
        port = await server.start()
        task = asyncio.create_task(keep_window(server, window, lambda: clock[0]))
        try:
            await asyncio.sleep(0)
            assert server.listening
            clock[0] = moment(17, 30)
            task.cancel()
            task = asyncio.create_task(keep_window(server, window, lambda: clock[0]))
            await until(lambda: not server.listening, "the node to stop listening")
            assert not await asyncio.to_thread(port_open, port)
            clock[0] = moment(8, 1, days=1)
            task.cancel()
            task = asyncio.create_task(keep_window(server, window, lambda: clock[0]))
            await until(lambda: server.listening, "the node to listen again")
            assert server.port == port
            assert await asyncio.to_thread(port_open, port)
        finally:
            task.cancel()
            await server.stop()

    run(main())


def test_a_port_taken_while_closed_is_retried_not_given_up(
    tmp_path: Path,
    allow_error_logs: list[logging.LogRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another program took the node's port during its closed hours: the window's
    task died of the OSError at the next opening, and the node stayed closed for
    ever without a word. Now it logs one error and listens once the port is free."""
    window = ServiceWindow(at(8), at(17), at(18))
    clock = [moment(17, 30)]
    monkeypatch.setattr(service, "RESUME_RETRY", 0.05, raising=False)

    async def main() -> None:
        server = NodeServer(
            NodeConfig(
                host="127.0.0.1",
                port=0,
                secret=b"service-window-test-secret-0123456789",
                dest_path=str(tmp_path / "dest"),
            )
        )
        port = await server.start()
        task = asyncio.create_task(keep_window(server, window, lambda: clock[0]))
        blocker = socket.socket()
        try:
            async with asyncio.timeout(10):
                while server.listening:
                    await asyncio.sleep(0.01)
                blocker.bind(("127.0.0.1", port))
                blocker.listen()
                clock[0] = moment(8, 1, days=1)
                task.cancel()  # asleep until 18:00: a new one reads the clock now
                task = asyncio.create_task(
                    keep_window(server, window, lambda: clock[0])
                )
                while not allow_error_logs:
                    assert not task.done(), task
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # a few attempts: one error only
                blocker.close()
                while not server.listening:
                    assert not task.done(), task
                    await asyncio.sleep(0.01)
            assert server.port == port
            assert len(allow_error_logs) == 1
            assert "cannot serve again" in allow_error_logs[0].getMessage()
        finally:
            blocker.close()
            task.cancel()
            await server.stop()

    run(main())
