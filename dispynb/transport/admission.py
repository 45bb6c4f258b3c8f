"""Who may start a handshake: pending shares, failure throttling, tallied logs.

A node has a global limit of connections in their handshake; one source address may
hold only a share of it, so a single peer cannot lock everybody else out. When all
slots are taken (peers on many addresses), a new connection takes the slot of the
oldest handshake of the address holding the most (`crowded_out`), so that holding
every slot locks nobody out: an attacker would have to open connections faster than a
client finishes its handshake. A source whose
handshakes keep failing (wrong secret, garbage, timeouts) is throttled: its new
connections are refused at accept until its failure budget refills, which bounds online
guessing of the secret. Refusals and failures are logged as counts per source and
period, never one line per connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from dispynb import wording

#: Connections allowed in their handshake at once, from all sources together.
MAX_PENDING_HANDSHAKES = 64

#: Connections one source address (an IPv6 /64) may have in their handshake at once.
MAX_PENDING_PER_SOURCE = 8

#: Failed handshakes a source may have in a burst before it is throttled...
FAILURE_BURST = 10

#: ...and the failures per second it is allowed in the long run.
FAILURE_RATE = 0.5

#: Seconds between the summary lines of repeated events of one kind and source.
LOG_PERIOD = 60.0

#: Sources remembered (least recently seen forgotten first), to bound memory.
_MAX_SOURCES = 4096


def source_of(address: object) -> str:
    """The source a peer address counts under: its IPv4 address, or its IPv6 /64."""
    host = address[0] if isinstance(address, tuple) else str(address)
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class Admission:
    """Decides at accept whether a connection may start its handshake.

    Call `admit` for each accepted connection, with a key of its own (its socket);
    when it returns None, call `release` once its handshake ends, and `failed` if
    the handshake failed. When `admit` would refuse it only because every slot is
    taken, `crowded_out` names the handshake to drop (release it) to make room.
    """

    def __init__(
        self,
        max_pending: int = MAX_PENDING_HANDSHAKES,
        max_pending_per_source: int = MAX_PENDING_PER_SOURCE,
        failure_burst: int = FAILURE_BURST,
        failure_rate: float = FAILURE_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.failure_burst = failure_burst
        self.failure_rate = failure_rate
        self._clock = clock
        self._pending: OrderedDict[Hashable, str] = OrderedDict()  # oldest first
        self._pending_by_source: dict[str, int] = {}
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def pending(self) -> int:
        """Connections in their handshake now."""
        return len(self._pending)

    def admit(self, source: str, key: Hashable) -> str | None:
        """None if ``source`` may start a handshake now (``key`` counted as pending),
        else why not (a sentence for the peer and the log)."""
        if self._throttled(source):
            return (
                "too many failed handshakes from your address: wait, then check "
                "that client and node use the same secret"
            )
        if self._pending_by_source.get(source, 0) >= self.max_pending_per_source:
            return (
                "too many connections from your address are in their handshake: "
                "retry shortly"
            )
        if self.pending >= self.max_pending:
            return "too many connections are in their handshake: retry shortly"
        self._pending[key] = source
        self._pending_by_source[source] = self._pending_by_source.get(source, 0) + 1
        return None

    def crowded_out(self, source: str) -> Hashable | None:
        """The pending handshake to drop so that a connection from ``source`` can
        start its own, or None: there is room, or ``source`` is refused anyway
        (throttled, or over its share).

        Every slot taken: the oldest handshake of the source holding the most (an
        attacker holding slots from many addresses loses its oldest first).
        """
        if self.pending < self.max_pending or self._throttled(source):
            return None
        if self._pending_by_source.get(source, 0) >= self.max_pending_per_source:
            return None
        most = max(self._pending_by_source.values())
        return next(
            key
            for key, holder in self._pending.items()
            if self._pending_by_source[holder] == most
        )

    def release(self, key: Hashable) -> None:
        """The handshake ``key`` ended (or was dropped); nothing if already released."""
        source = self._pending.pop(key, None)
        if source is None:
            return
        left = self._pending_by_source[source] - 1
        if left:
            self._pending_by_source[source] = left
        else:
            del self._pending_by_source[source]

    def failed(self, source: str) -> None:
        """A handshake from ``source`` failed: spend one token of its budget."""
        bucket = self._refilled(source)
        bucket.tokens -= 1

    def _throttled(self, source: str) -> bool:
        if source not in self._buckets:
            return False
        return self._refilled(source).tokens < 1

    def _refilled(self, source: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.pop(source, None)
        if bucket is None:
            bucket = _Bucket(float(self.failure_burst), now)
        else:
            bucket.tokens = min(
                float(self.failure_burst),
                bucket.tokens + (now - bucket.stamp) * self.failure_rate,
            )
            bucket.stamp = now
        self._buckets[source] = bucket
        while len(self._buckets) > _MAX_SOURCES:
            self._buckets.popitem(last=False)
        return bucket


class Tally:
    """Logs repeated events as counts, so no peer can flood the log.

    Per kind of event (``what``) and ``period``: the first `IMMEDIATE` events from
    distinct sources are logged at once, with their detail; the rest are counted, and
    one line at the end of the period says how many there were, from how many
    sources, which source sent most, and the last detail. Lines are logged at
    ``level``.
    """

    IMMEDIATE = 3

    def __init__(
        self,
        log: logging.Logger,
        period: float = LOG_PERIOD,
        level: int = logging.WARNING,
    ) -> None:
        self._log = log
        self.period = period
        self.level = level
        self._logged: dict[str, set[str]] = {}
        self._counted: dict[str, dict[str, int]] = {}
        self._last: dict[str, str] = {}
        self._timer: asyncio.TimerHandle | None = None

    def event(self, what: str, source: str, detail: str = "", who: str = "") -> None:
        """One event ``what`` (e.g. "rejected connections") from ``source``;
        ``who``: the peer in words (its address and port, the name it gave), said
        in its place, so that an administrator can tell which client it was."""
        logged = self._logged.setdefault(what, set())
        if source not in logged and len(logged) < self.IMMEDIATE:
            logged.add(source)
            self._log.log(
                self.level, "%s from %s: %s", what, who or source, detail or "no detail"
            )
        else:
            if who:
                detail = f"{who}: {detail or 'no detail'}"
            counted = self._counted.setdefault(what, {})
            if source in counted or len(counted) < _MAX_SOURCES:
                counted[source] = counted.get(source, 0) + 1
            else:
                counted["other sources"] = counted.get("other sources", 0) + 1
            self._last[what] = detail
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.period, self.flush)

    def flush(self) -> None:
        """Log the counts gathered since the last flush; start a new period."""
        self._timer = None
        for what, counted in self._counted.items():
            total = sum(counted.values())
            top = max(counted, key=counted.__getitem__)
            # "from 1 source", "from 10 sources": it said "from 1 source(s)"; the
            # count follows the plural ``what``: it said "1 more rejected
            # connections".
            self._log.log(
                self.level,
                "%s: %d more from %s in the last %g s (most from %s: %d; last: %s)",
                what,
                total,
                wording.counted(len(counted), "source"),
                self.period,
                top,
                counted[top],
                self._last.get(what) or "no detail",
            )
        self._logged.clear()
        self._counted.clear()
        self._last.clear()

    def close(self) -> None:
        """Log what is left and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
