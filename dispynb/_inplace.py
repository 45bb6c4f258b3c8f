"""A thread waiting for a job's result reads it in the I/O loop's place (W2, issue 17).

Without this, a result wakes two threads: the loop thread (its socket is readable),
which records the result and wakes the user's thread waiting in ``job()``, which
then waits for the loop thread's GIL. A round trip of a tiny job (W2) is mostly
such hops. Here the waiting thread, while the loop thread sleeps in ``epoll`` with
nothing to do (`LoopRunner.enter`), takes the loop's sockets out of that ``epoll``
for a few milliseconds (`IN_PLACE_WAIT`), waits on them itself and runs their read
callbacks as the loop would (the same code, one at a time, in order): the result
reaches the waiting thread with no other thread woken. Then the sockets go back.

The loop thread is never woken for what the waiting thread reads, and never runs
meanwhile: anything else for it (another thread's ``call_soon_threadsafe``, a
callback scheduled by what was read) ends the wait at once, and a timer that falls
due waits for the end of the wait (`IN_PLACE_WAIT` at most). Signals that would
raise on the main thread (Ctrl-C, Stop) are held meanwhile and raised as it ends,
so a result is never half recorded.

Only where the loop's selector is ``epoll`` (Linux) and not in asyncio's debug mode
(which refuses callbacks scheduled from another thread); elsewhere the wait is the
usual one.
"""

from __future__ import annotations

import asyncio
import math
import select
import selectors
import time
from collections.abc import Callable

from dispynb._loop import LoopRunner

__all__ = ["IN_PLACE_WAIT", "MAX_READERS", "wait_in_place"]

#: Seconds a waiting thread reads in the loop's place at most; a result that takes
#: longer is waited for as before (the loop thread reads it and wakes the waiter).
IN_PLACE_WAIT = 0.005

#: Sockets the loop may be reading for the wait to be taken: each is taken out of
#: the loop's ``epoll`` and put back (one system call each).
MAX_READERS = 8

_EPOLL = {
    0: 0,
    selectors.EVENT_READ: select.EPOLLIN,
    selectors.EVENT_WRITE: select.EPOLLOUT,
    selectors.EVENT_READ | selectors.EVENT_WRITE: select.EPOLLIN | select.EPOLLOUT,
}


def wait_in_place(
    runner: LoopRunner, done: Callable[[], bool], budget: float = IN_PLACE_WAIT
) -> bool:
    """Until ``done()`` or ``budget`` seconds have passed, read the loop's sockets
    on this thread if the loop is idle (see the module docstring).

    Returns False at once if the loop is busy, if this is the loop's thread (or one
    in its place already), or where the wait cannot be taken; True once it has
    waited in the loop's place. Raises what a signal handler held meanwhile raises
    (`LoopRunner.leave`), e.g. `KeyboardInterrupt`.
    """
    loop = runner.loop
    selector = getattr(loop, "_selector", None)
    if (
        budget <= 0
        or not isinstance(selector, selectors.EpollSelector)
        or loop.get_debug()
        or not runner.enter()
    ):
        return False
    try:
        return _read(runner, loop, selector, done, budget)
    finally:
        runner.leave()


def _read(
    runner: LoopRunner,
    loop: asyncio.AbstractEventLoop,
    selector: selectors.EpollSelector,
    done: Callable[[], bool],
    budget: float,
) -> bool:
    """`wait_in_place`'s body, with the loop held (`LoopRunner.enter`)."""
    # The loop thread may have let go in a select that does not wait (callbacks
    # are due): they go first. Timers bound the wait: they run on time.
    if loop._ready:  # type: ignore[attr-defined]
        return False
    scheduled = loop._scheduled  # type: ignore[attr-defined]
    if scheduled:
        budget = min(budget, scheduled[0].when() - loop.time())
        if budget <= 0:
            return False
    epoll: select.epoll = selector._selector  # type: ignore[attr-defined]
    wake_fd: int = loop._ssock.fileno()  # type: ignore[attr-defined]
    # fd -> SelectorKey: the selector's own table (its public mapping costs a few
    # Python calls per lookup); only read here, as the loop's thread would.
    keys: dict[int, selectors.SelectorKey] = selector._fd_to_key  # type: ignore[attr-defined]
    readers = tuple(
        fd
        for fd, key in keys.items()
        if fd != wake_fd and key.events & selectors.EVENT_READ and key.data[0]
    )
    if not readers or len(readers) > MAX_READERS:
        return False
    poller = _poller(wake_fd, readers)
    parked: list[int] = []
    try:
        for fd in readers:
            # The loop thread keeps waiting, now for writes only: what arrives on
            # these sockets wakes this thread alone.
            try:
                epoll.modify(fd, _EPOLL[keys[fd].events & selectors.EVENT_WRITE])
            except OSError:
                return False  # the loop's to sort out; those parked go back below
            parked.append(fd)
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(loop)  # the callbacks run "on the loop"
        try:
            _poll(runner, poller, keys, wake_fd, done, time.monotonic() + budget)
        finally:
            asyncio.events._set_running_loop(previous)
    finally:
        for fd in parked:  # as the loop's registrations are now (callbacks change them)
            key = keys.get(fd)
            if key is not None:
                try:  # noqa: SIM105 - no context manager per job
                    epoll.modify(fd, _EPOLL[key.events])
                except OSError:  # closed meanwhile: the loop's to sort out
                    pass
    return True


#: The last poll object made, for the same sockets next time: (fds, poll object).
#: One thread at a time uses it, the one in the loop's place.
_last_poller: tuple[tuple[int, ...], select.poll] | None = None


def _poller(wake_fd: int, readers: tuple[int, ...]) -> select.poll:
    """A poll object waiting for input on ``wake_fd`` and ``readers``."""
    global _last_poller
    fds = (wake_fd, *readers)
    last = _last_poller
    if last is not None and last[0] == fds:
        return last[1]
    poller = select.poll()
    for fd in fds:  # the loop's wake-up first: anything else for it ends the wait
        poller.register(fd, select.POLLIN)
    _last_poller = (fds, poller)
    return poller


def _poll(
    runner: LoopRunner,
    poller: select.poll,
    keys: dict[int, selectors.SelectorKey],
    wake_fd: int,
    done: Callable[[], bool],
    deadline: float,
) -> None:
    """Wait on ``poller`` and run the read callbacks of the sockets that are ready."""
    while not done() and not runner.interrupt_pending and not runner.stray:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for fd, _flags in poller.poll(math.ceil(left * 1000)):
            if fd == wake_fd:
                return  # the loop has work: leave it to the loop thread
            key = keys.get(fd)
            reader = key.data[0] if key is not None else None
            if reader is None or reader.cancelled():
                global _last_poller
                _last_poller = None  # changed: not for the next wait
                poller.unregister(fd)  # no longer read (closed, paused)
                continue
            reader._run()  # as the loop runs it: exceptions go to its handler
