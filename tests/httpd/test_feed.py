"""`ChangeFeed`: long-poll wake-ups from a `ClusterMonitor`'s version."""

from __future__ import annotations

import asyncio
import threading

from dispynb.httpd.feed import ChangeFeed
from tests.asyncutil import run


class _Monitor:
    """The part of `ClusterMonitor` a feed uses: a version that can be moved."""

    def __init__(self) -> None:
        self.version = 7
        self._changed = threading.Condition()

    def wait_change(self, version: int, timeout: float) -> int:
        with self._changed:
            self._changed.wait_for(lambda: self.version != version, timeout)
            return self.version

    def bump(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()


def test_a_late_wake_up_for_an_older_change_does_not_end_a_long_poll() -> None:
    """A waiter that already has the current version waits its whole timeout even
    when the watcher's wake-up for a change it has seen arrives meanwhile; a real
    change still ends it at once."""

    async def main() -> None:
        monitor = _Monitor()
        feed = ChangeFeed(monitor, asyncio.get_running_loop())  # type: ignore[arg-type]
        waiter = asyncio.create_task(feed.wait(7, timeout=60))
        while feed.waiting == 0:
            await asyncio.sleep(0)
        feed._wake()  # the late wake-up (what the watcher thread sends)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiter.done()
        monitor.bump()
        feed._wake()
        await asyncio.wait_for(waiter, 10)
        assert feed.waiting == 0
        # Timing out still ends it, with nothing changed.
        await asyncio.wait_for(feed.wait(8, timeout=0.05), 10)

    run(main())
