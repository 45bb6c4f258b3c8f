"""Delivery of user callbacks (``job_status``, ``cluster_status``) on one thread.

As in dispy, callbacks run serially, in the order they were posted, never in the
I/O thread nor in the caller's thread; a callback that raises is logged and the
next one runs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final

from dispynb import _interruptible

logger = logging.getLogger(__name__)

_THREAD_NAME = "dispynb-callbacks"

#: Queue item telling the worker thread to exit.
_STOP: Final = object()
_Lock: Final = type(threading.Lock())


class CallbackDispatcher:
    """Run callbacks serially, in FIFO order, on a daemon thread ("dispynb-callbacks").

    The thread starts with the first :meth:`post`. Safe to use from any thread,
    including from a callback it is running.

    Examples
    --------
    >>> dispatcher = CallbackDispatcher()
    >>> dispatcher.post(print, "job done")
    >>> dispatcher.close(timeout=5)
    job done
    True
    """

    def __init__(self, held: bool = False) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # While held, callbacks queue up but do not run (see `release`).
        self._released = threading.Event()
        if not held:
            self._released.set()
        self._thread: threading.Thread | None = None
        # Guards starting and closing, so that nothing is queued behind _STOP.
        self._lock: threading.Lock = threading.Lock()
        self._closed: bool = False

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` to run after every callback posted before it.

        Never blocks, so a callback may post more callbacks.

        Raises
        ------
        RuntimeError
            If the dispatcher has been closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(
                    f"cannot post {_name(fn)}: the callback dispatcher is closed"
                )
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name=_THREAD_NAME, daemon=True
                )
                _interruptible.start_thread(self._thread)
            self._queue.put((fn, args))

    def post_each(
        self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]]
    ) -> None:
        """`post` ``fn(*args)`` for each ``args`` of ``calls``, in order, as one
        item (a Stop's 200,000 cancelled jobs: one post, not 200,000). ``calls``
        is read on the callback thread: made there, not held meanwhile."""
        self.post(_call_each, fn, calls)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every callback posted before this call has run.

        Returns
        -------
        True if they all ran, False if ``timeout`` seconds passed first.

        Raises
        ------
        RuntimeError
            If called from a callback: it would wait for itself.
        """
        if self.in_dispatcher_thread():
            raise RuntimeError(
                "flush() was called from a callback, where waiting would deadlock"
            )
        with self._lock:
            thread = self._thread
            if thread is None:
                return True
            if self._closed:
                # Everything was queued before _STOP: the thread's end is the flush.
                done = None
            else:
                done = threading.Lock()  # released by the thread once it gets there
                done.acquire()
                self._queue.put(done)
        if done is None:
            thread.join(timeout)
            return not thread.is_alive()
        return _interruptible.acquire(done, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Run the callbacks already posted, then stop the thread; idempotent.

        Called from a callback, it stops the thread after the queued callbacks
        without waiting for them.

        Returns
        -------
        True if the thread has stopped (or never started), False if ``timeout``
        seconds passed first.
        """
        with self._lock:
            thread = self._thread
            if not self._closed:
                self._closed = True
                if thread is not None:
                    self._queue.put(_STOP)
        if thread is None:
            return True
        if self.in_dispatcher_thread():
            return False
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("Callbacks still running %s s after close()", timeout)
            return False
        return True

    def in_dispatcher_thread(self) -> bool:
        """Return True when called from a callback run by this dispatcher."""
        thread = self._thread
        return thread is not None and thread.ident == threading.get_ident()

    def release(self) -> None:
        """Let held callbacks run (a `JobCluster` holds them while it is created, so
        that callbacks can use the variable the new cluster is assigned to)."""
        self._released.set()

    def _work(self) -> None:
        """Body of the dispatcher thread."""
        self._released.wait()
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            if type(item) is _Lock:  # a flush waits on it (not an Event: `Sleepers`)
                item.release()
                continue
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # sys.exit() too: it would end this thread
                logger.exception("Callback %s raised an exception", _name(fn))
            # Drop references now: callbacks may hold large jobs or results.
            del item, fn, args


def _call_each(fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]]) -> None:
    """`CallbackDispatcher.post_each`'s item: each call logged apart if it raises,
    as posted apart."""
    for args in calls:
        try:
            fn(*args)
        except BaseException:  # sys.exit() too: it would end the rest
            logger.exception("Callback %s raised an exception", _name(fn))


def _name(fn: Callable[..., Any]) -> str:
    """A readable name for a callable, for messages."""
    return getattr(fn, "__qualname__", None) or repr(fn)
