"""Delivery of user callbacks (``job_status``, ``cluster_status``) on one thread.

As in dispy, callbacks run serially, in the order they were posted, never in the
I/O thread nor in the caller's thread; a callback that raises is logged and the
next one runs.

Python 3.12.0 and 3.12.1 start no thread once the interpreter exits (3.12.2 does
again): a script's clusters left open wait for their jobs there, and their results
come then. So a cluster with callbacks starts the thread as it is made (`start`),
and where no thread can start the callbacks wait for `flush` or `close`, whose caller
runs them; a post never fails for want of a thread (on the I/O thread, that lost
the node whose result it was).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
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

    The thread starts with :meth:`start` or the first :meth:`post`. Safe to use
    from any thread, including from a callback it is running.

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
        # No thread could start: `flush` and `close` run the callbacks in their
        # caller, one caller at a time (the one running them: `_runner`).
        self._threadless: bool = False
        self._running_here: threading.Lock = threading.Lock()
        self._runner: int | None = None

    def start(self) -> None:
        """Start the thread now, not with the first post: a cluster with callbacks
        does as it is made, since its jobs may end as the interpreter exits, where
        Python 3.12.0 and 3.12.1 start no thread. Idempotent; nothing once closed.
        """
        with self._lock:
            if not self._closed:
                self._start()

    def _start(self) -> None:
        """Start the thread unless it runs or cannot start (``self._lock`` held)."""
        if self._thread is not None or self._threadless:
            return
        thread = threading.Thread(target=self._work, name=_THREAD_NAME, daemon=True)
        try:
            _interruptible.start_thread(thread)
        except RuntimeError as exc:  # at exit on 3.12.0-1, or the thread limit
            logger.debug("no callback thread (%s): flush() or close() runs them", exc)
            self._threadless = True
            return
        self._thread = thread

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
                self._start()
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
        done = None  # closed: everything was queued before _STOP, the thread's end
        with self._lock:  # is the flush
            thread = self._thread
            if thread is not None and not self._closed:
                done = threading.Lock()  # released by the thread once it gets there
                done.acquire()
                self._queue.put(done)
        if thread is None:
            return not self._threadless or self._run_here(timeout)
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
        if self.in_dispatcher_thread():
            return False
        if thread is None:
            return not self._threadless or self._run_here(timeout)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("Callbacks still running %s s after close()", timeout)
            return False
        return True

    def in_dispatcher_thread(self) -> bool:
        """Return True when called from a callback run by this dispatcher."""
        thread = self._thread
        if thread is None:
            return self._runner == threading.get_ident()
        return thread.ident == threading.get_ident()

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
            _run(item)
            del item  # now: callbacks may hold large jobs or results

    def _run_here(self, timeout: float | None) -> bool:
        """Run the callbacks queued (and those they post) in this thread, which no
        thread could start to run; False if ``timeout`` seconds passed first.

        Called after `release` (by `flush` and `close`, once the cluster is made).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not _interruptible.acquire(self._running_here, timeout):
            return False  # another thread runs them
        self._runner = threading.get_ident()
        try:
            while deadline is None or time.monotonic() < deadline:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return True
                # A Ctrl-C here is the user's (the exit's wait): raised, not logged.
                _run(item, KeyboardInterrupt)
                del item
            return self._queue.empty()
        finally:
            self._runner = None
            self._running_here.release()


def _run(
    item: tuple[Callable[..., Any], tuple[Any, ...]],
    raised: type[BaseException] | tuple[()] = (),
) -> None:
    """Run one callback posted, logging what it raises (but ``raised``)."""
    fn, args = item
    try:
        fn(*args)
    except raised:
        raise
    except BaseException:  # sys.exit() too: it would end the thread running it
        logger.exception("Callback %s raised an exception", _name(fn))


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
