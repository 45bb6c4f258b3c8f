"""Long-poll wake-ups: `ClusterMonitor.wait_change` turned into an asyncio event.

One watcher thread blocks in ``wait_change`` and wakes the server's loop when the
monitor's version moves, at most `MIN_INTERVAL` apart: any number of browsers then
wait on one asyncio event and no thread is held per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING

from dispynb._interruptible import start_thread

if TYPE_CHECKING:
    from dispynb.monitoring import ClusterMonitor

#: Seconds between two wake-ups at most once per this interval, so thousands of job
#: changes a second cost the browsers a few snapshots, not thousands.
MIN_INTERVAL = 0.1

#: Seconds the watcher blocks in ``wait_change`` before it looks at its stop flag.
_WATCH_TIMEOUT = 0.5


class ChangeFeed:
    """Wake long-polls on a loop when a `ClusterMonitor` changes.

    Create, start and stop it on the loop's thread; :meth:`join` from another thread.
    """

    def __init__(
        self, monitor: ClusterMonitor, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._monitor = monitor
        self._loop = loop
        self._event = asyncio.Event()
        self._stop = threading.Event()
        #: Long-polls waiting now.
        self.waiting = 0
        self._thread = threading.Thread(
            target=self._watch, name="dispynb-httpd-watch", daemon=True
        )

    def start(self) -> None:
        """Start the watcher thread."""
        start_thread(self._thread)

    def stop(self) -> None:
        """Wake every waiter and tell the watcher to end; call on the loop's thread."""
        self._stop.set()
        self._wake()

    def join(self) -> None:
        """Wait for the watcher thread to end (within half a second of `stop`)."""
        if self._thread.is_alive():
            self._thread.join(timeout=2 * _WATCH_TIMEOUT)

    async def wait(self, since: int, timeout: float) -> None:
        """Return once the monitor's version is not ``since``, or after ``timeout``."""
        if self._monitor.version != since or self._stop.is_set():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.waiting += 1
        try:
            # A wake-up can be late (the watcher thread runs when it gets the CPU):
            # one for a change made before ``since`` was read is no change to this
            # waiter, so it waits on (a closed cluster's long-poll used to answer at
            # once, under load, instead of after ``timeout``).
            while self._monitor.version == since and not self._stop.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._event.wait(), remaining)
        finally:
            self.waiting -= 1

    def _watch(self) -> None:
        version = self._monitor.version
        while not self._stop.is_set():
            new = self._monitor.wait_change(version, _WATCH_TIMEOUT)
            if new != version:
                version = new
                self._wake_soon()
                self._stop.wait(MIN_INTERVAL)

    def _wake_soon(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()
