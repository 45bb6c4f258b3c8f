"""Tests of `Admission` (pending shares, failure throttle) and `Tally` (log counts)."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from dispynb.transport import listener as listener_module
from dispynb.transport.admission import Admission, Tally, source_of
from tests.asyncutil import run
from tests.transport.util import echo_round_trip, serving, wait_until


@pytest.mark.parametrize(
    ("address", "source"),
    [
        (("10.0.0.5", 1234), "10.0.0.5"),
        (("::ffff:10.0.0.5", 1234, 0, 0), "10.0.0.5"),
        (("2001:db8:1:2:aaaa::1", 1, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 1, 0, 0), "2001:db8:1:2::/64"),
        (("::1", 1, 0, 0), "::1"),
        (("fe80::1%eth0", 1, 0, 0), "fe80::/64"),
    ],
)
def test_source_of_groups_ipv6_by_64(address, source):
    assert source_of(address) == source


def test_one_source_gets_its_share_and_others_still_get_in():
    admission = Admission(max_pending=4, max_pending_per_source=2)
    assert admission.admit("a", 1) is None
    assert admission.admit("a", 2) is None
    assert "from your address" in (admission.admit("a", 3) or "")
    assert admission.crowded_out("a") is None  # its share is full, not the slots
    assert admission.admit("b", 4) is None
    assert admission.admit("c", 5) is None
    assert "too many connections" in (admission.admit("d", 6) or "")
    admission.release(1)
    admission.release(1)  # released once only
    assert admission.admit("a", 3) is None
    assert admission.pending == 4


def test_a_new_source_crowds_out_the_oldest_handshake_of_the_source_holding_most():
    """All slots taken by peers of many addresses: a newcomer takes the slot of the
    oldest handshake of the address holding the most, ties to the oldest."""
    admission = Admission(max_pending=4, max_pending_per_source=2)
    for key, source in [(1, "b"), (2, "a"), (3, "c"), (4, "a")]:
        assert admission.admit(source, key) is None
    assert admission.crowded_out("d") == 2  # "a" holds two: its oldest
    admission.release(2)
    assert admission.admit("d", 5) is None
    assert admission.crowded_out("e") == 1  # one each now: the oldest of all
    assert admission.crowded_out("d") == 1
    admission.release(1)
    assert admission.admit("d", 6) is None
    assert admission.crowded_out("d") is None  # "d" holds its share of 2


def test_failures_throttle_a_source_until_its_budget_refills():
    now = [0.0]
    admission = Admission(failure_burst=3, failure_rate=0.5, clock=lambda: now[0])
    for key in range(3):
        assert admission.admit("a", key) is None
        admission.release(key)
        admission.failed("a")
    assert "failed handshakes" in (admission.admit("a", 3) or "")
    assert admission.admit("b", 4) is None  # others are not affected
    now[0] += 2.0  # one token back
    assert admission.admit("a", 5) is None


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_tally_logs_a_few_sources_at_once_then_counts():
    log = logging.getLogger("tests.tally")
    lines = _Lines()
    log.addHandler(lines)

    async def main() -> None:
        tally = Tally(log, period=60)
        for i in range(100):
            tally.event("rejected connections", f"10.0.0.{i % 10}", f"reason {i}")
        assert len(lines.lines) == Tally.IMMEDIATE
        tally.close()

    try:
        asyncio.run(main())
    finally:
        log.removeHandler(lines)
    assert len(lines.lines) == Tally.IMMEDIATE + 1
    assert lines.lines[-1].startswith("rejected connections: 97 more from 10 sources")
    assert "last: reason 99" in lines.lines[-1]


class _Exhausted:
    """A listening socket whose accept fails for lack of descriptors."""

    def accept(self):
        raise OSError(errno.EMFILE, "Too many open files")


def test_listener_out_of_descriptors_pauses_then_serves_again(caplog):
    async def main() -> None:
        async with serving() as (listener, _):
            listener._accept(_Exhausted())  # type: ignore[arg-type]
            assert listener._retry is not None  # paused: not watching its sockets
            listener._accept(_Exhausted())  # type: ignore[arg-type]
            await echo_round_trip(listener.port)  # served once the retry fires
            await wait_until(lambda: listener._paused_since is None)
            listener._accept(_Exhausted())  # type: ignore[arg-type]
        # stop() while paused leaves nothing watched

    run(main())
    lines = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
    assert len(lines) == 3, lines  # paused, accepting again, paused
    assert "pausing" in lines[0] and "after" in lines[1] and "2 accept" in lines[1]


def test_listener_short_again_after_a_lull_is_the_same_episode(caplog, monkeypatch):
    """Out of descriptors, the queue drained, out again before `EPISODE_QUIET`:
    one pause line and one end line with every failed accept, not a pair per lull
    (what clients slow to reconnect on a loaded machine caused)."""
    # Longer than any stall between the drain and the next failure, however loaded.
    monkeypatch.setattr(listener_module, "EPISODE_QUIET", 5.0)

    async def main() -> None:
        async with serving() as (listener, _):
            listener._accept(_Exhausted())  # type: ignore[arg-type]
            began = listener._paused_since
            await echo_round_trip(listener.port)  # resumed, accepted, drained
            listener._accept(_Exhausted())  # type: ignore[arg-type]
            assert listener._paused_since == began
            await echo_round_trip(listener.port)
            await wait_until(lambda: listener._paused_since is None)

    run(main())
    lines = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "pausing" in lines[0] and "2 accept" in lines[1]


def test_tally_counts_one_more_event_without_a_wrong_plural():
    """One event counted past those logged at once: its line said "1 more rejected
    connections from 1 source"; the count now follows the kind of event."""
    log = logging.getLogger("tests.tally")
    lines = _Lines()
    log.addHandler(lines)

    async def main() -> None:
        tally = Tally(log, period=60)
        for i in range(2):  # the first logged at once, the second counted
            tally.event("rejected connections", "10.0.0.1", f"reason {i}")
        tally.close()

    try:
        asyncio.run(main())
    finally:
        log.removeHandler(lines)
    assert lines.lines[-1].startswith("rejected connections: 1 more from 1 source ")
