"""Daily service window: ``dispynb-node --service_start/--service_stop/--service_end``.

As dispynode's: each day the node serves from ``start``; from ``stop`` it takes no new
clients (connected ones go on); from ``end`` it has no clients at all (their running
jobs are terminated), until the next ``start``. A time left out is skipped, except
``start``, which is midnight.

`ServiceWindow.phase_at` is pure (a clock reading in, a phase and the time of the next
change out); `keep_window` applies it to a running `NodeServer`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from dispynb.errors import ConfigurationError

if TYPE_CHECKING:
    from nodeserver.server import NodeServer

logger = logging.getLogger(__name__)


class Phase(enum.IntEnum):
    """What the node does in a part of the day (higher wins when times are equal)."""

    SERVING = 0
    STOPPED = 1  # no new clients
    ENDED = 2  # no clients


def parse_time(text: str) -> datetime.time:
    """``'18:30'`` -> 18:30 (dispynode's HH:MM)."""
    try:
        hours, minutes = (int(part) for part in text.strip().split(":"))
        return datetime.time(hours, minutes)
    except ValueError:
        raise ValueError(f"bad time of day {text!r}: use HH:MM, e.g. 18:30") from None


@dataclasses.dataclass(frozen=True)
class ServiceWindow:
    """The times of day at which the node starts, stops and ends serving."""

    start: datetime.time | None = None
    stop: datetime.time | None = None
    end: datetime.time | None = None

    def __post_init__(self) -> None:
        if self.stop is None and self.end is None:
            raise ConfigurationError(
                "--service_start needs --service_stop or --service_end: the window "
                "is daily (leave all three out to serve all the time)"
            )

    def _events(self) -> list[tuple[datetime.time, Phase]]:
        events = [(self.start or datetime.time(0, 0), Phase.SERVING)]
        if self.stop is not None:
            events.append((self.stop, Phase.STOPPED))
        if self.end is not None:
            events.append((self.end, Phase.ENDED))
        return sorted(events)

    def phase_at(self, now: datetime.datetime) -> tuple[Phase, datetime.datetime]:
        """The phase at ``now`` and when the next change happens.

        >>> at = datetime.time
        >>> window = ServiceWindow(at(8), at(17), at(18))
        >>> window.phase_at(datetime.datetime(2026, 1, 1, 12))
        (<Phase.SERVING: 0>, datetime.datetime(2026, 1, 1, 17, 0))
        >>> window.phase_at(datetime.datetime(2026, 1, 1, 20))
        (<Phase.ENDED: 2>, datetime.datetime(2026, 1, 2, 8, 0))
        """
        events = self._events()
        # Events of yesterday, today and tomorrow as datetimes, latest phase first
        # among equal times.
        day = now.date()
        moments = sorted(
            (datetime.datetime.combine(day + datetime.timedelta(days=d), t), phase)
            for d in (-1, 0, 1)
            for t, phase in events
        )
        phase = Phase.SERVING
        for moment, event_phase in moments:
            if moment <= now:
                phase = event_phase
            else:
                return phase, moment
        raise AssertionError("tomorrow always has events")  # pragma: no cover


#: Seconds between attempts to listen again when the node's port is taken.
RESUME_RETRY = 10.0


async def keep_window(
    server: NodeServer,
    window: ServiceWindow,
    clock: Callable[[], datetime.datetime] = datetime.datetime.now,
) -> None:
    """Open and close ``server`` along ``window`` until cancelled.

    A port that cannot be listened on again (another program took it while the
    node was closed) is an error logged once, tried again every `RESUME_RETRY` s:
    the node had stopped following its window, closed for ever without a word."""
    failing = ""
    while True:
        now = clock()
        phase, until = window.phase_at(now)
        at = until.strftime("%H:%M")
        if phase is Phase.SERVING:
            if not server.listening:
                try:
                    await server.resume()
                except OSError as exc:
                    if str(exc) != failing:
                        logger.error(
                            "service window: cannot serve again (%s); trying every "
                            "%g s",
                            exc,
                            RESUME_RETRY,
                        )
                        failing = str(exc)
                    await asyncio.sleep(RESUME_RETRY)
                    continue
                failing = ""
                logger.info("service window: serving until %s", at)
        else:
            if server.listening:
                server.pause()
                logger.info("service window: no new clients until %s", at)
            if phase is Phase.ENDED and server.sessions:
                logger.info("service window: ending every client's jobs until %s", at)
                await server.end_sessions()
        # Sleep in bounded steps: the wall clock may jump (suspend, NTP).
        await asyncio.sleep(min(max((until - now).total_seconds(), 0.5), 60.0))
