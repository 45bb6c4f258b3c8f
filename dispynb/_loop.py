"""The client's background I/O thread: one asyncio event loop shared by every cluster.

The public API is synchronous (dispy's ``job()`` blocks), so the client runs its
sockets on a loop in a daemon thread and the user's thread talks to it through
this module. No other client module may start a thread that runs an event loop
(the web monitor, `dispynb.httpd`, runs its own so browsers never slow this one).

Contents
--------
LoopRunner
    The reference-counted background loop thread ("dispynb-io"), with ``run_sync``
    to call a coroutine from any other thread.
Coalescer
    Turns bursts of cross-thread wake-ups into one call on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import selectors
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from dispynb._interruptible import Flag, HeldInterrupts, start_thread
from dispynb._interruptible import acquire as acquire_interruptibly

logger = logging.getLogger(__name__)

T = TypeVar("T")

_THREAD_NAME = "dispynb-io"


class LoopRunner:
    """An asyncio event loop running in a daemon thread, shared by the whole process.

    Get it with :meth:`acquire` and give it back with :meth:`release`; the thread
    starts with the first ``acquire`` and stops when the last user releases it.

    Notes
    -----
    Only :meth:`run_sync`, :meth:`call_soon` and :meth:`in_loop_thread` may be
    called from other threads; everything else about :attr:`loop` belongs to the
    loop thread.

    Examples
    --------
    >>> runner = LoopRunner.acquire()
    >>> async def add(a, b):
    ...     return a + b
    >>> runner.run_sync(add, 1, 2)
    3
    >>> runner.release()
    """

    _instance: ClassVar[LoopRunner | None] = None
    _refcount: ClassVar[int] = 0
    _class_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        """Create a stopped runner; use :meth:`acquire` instead of calling this."""
        # Held by the loop thread whenever it is not waiting for I/O (see `enter`).
        self._busy: threading.Lock = threading.Lock()
        self._selector = _IdleSelector(self._busy)
        self._loop: _GuestLoop = _GuestLoop(self._selector)
        # The thread that took the loop's place (`enter`), while it has it.
        self._guest: int | None = None
        # Its Ctrl-C, held while it has the loop (the main thread only).
        self._held: HeldInterrupts | None = None
        self._thread: threading.Thread = threading.Thread(
            target=self._run, name=_THREAD_NAME, daemon=True
        )
        self._started = Flag()  # not an Event: see `Sleepers`
        # The loop thread's ident once it runs (Thread.ident is a property: asked
        # at every job sent or waited for).
        self._ident: int | None = None
        # asyncio keeps only weak references to tasks: hold the ones run_sync
        # creates until they finish.
        self._tasks: set[asyncio.Future[Any]] = set()
        self._released: bool = False
        # The run_sync call each thread waits in (by thread ident), for `interrupt`,
        # and the calls interrupted.
        self._waits_lock = threading.Lock()
        self._waits: dict[int, tuple[concurrent.futures.Future[Any], Any]] = {}
        self._interrupted: set[concurrent.futures.Future[Any]] = set()

    @classmethod
    def acquire(cls) -> LoopRunner:
        """Return the process-wide runner, starting its thread on first use.

        Every call must be paired with one :meth:`release`.
        """
        with cls._class_lock:
            if cls._instance is None:
                runner = cls()
                start_thread(runner._thread)
                runner._started.wait()
                cls._instance = runner
                logger.debug("I/O loop thread started")
            cls._refcount += 1
            return cls._instance

    def release(self) -> None:
        """Give back one reference; the last one stops the loop and joins the thread.

        Pending tasks are cancelled and awaited, async generators and the default
        executor are shut down, then the loop is closed (as ``asyncio.run`` does).
        Called from the loop thread itself, the loop is stopped but not joined.

        Raises
        ------
        RuntimeError
            If this runner has already been released by all its users.
        """
        cls = type(self)
        with cls._class_lock:
            if cls._instance is not self or cls._refcount <= 0:
                raise RuntimeError("LoopRunner.release() called more than acquire()")
            cls._refcount -= 1
            if cls._refcount > 0:
                return
            cls._instance = None
            self._released = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        if not self.in_loop_thread():
            self._thread.join()
            logger.debug("I/O loop thread stopped")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop run by the background thread."""
        return self._loop

    def in_loop_thread(self) -> bool:
        """Return True when called from the loop's own thread, or from a thread that
        has taken the loop's place (`enter`): waiting for the loop there would
        deadlock too."""
        ident = threading.get_ident()
        return ident == self._ident or ident == self._guest

    def enter(self) -> bool:
        """From another thread: take the loop's place while it waits for I/O.

        True if the loop thread is idle in its wait for I/O: it then stays out of
        every callback until :meth:`leave`, so the caller may use what belongs to
        the loop (a short, non-blocking step such as writing a message to a
        socket) without waking the loop thread first. It must not wait for the
        loop, schedule callbacks on it or wait for anything else meanwhile. False
        (never blocks) if the loop is busy, or from the loop thread itself.

        The main thread's Ctrl-C (SIGINT with a Python handler) is held until
        `leave`, which delivers it: raised in the middle of the loop's work (a
        message half read or half written, a result half recorded) it would cost
        the node its connection or the job its result, and skip `leave` itself.
        """
        if self._released or threading.get_ident() == self._ident:
            return False
        # Before the lock: a Ctrl-C that came just now is raised here, nothing held.
        held = HeldInterrupts().__enter__()
        if not self._busy.acquire(blocking=False):
            held.__exit__(None, None, None)  # busy: the loop thread goes first
            return False
        if self._loop.is_closed():  # its thread ended: nothing may run for it
            self._busy.release()
            held.__exit__(None, None, None)
            return False
        self._held = held
        self._guest = threading.get_ident()
        self._loop.guest = True
        return True

    def leave(self) -> None:
        """Give the loop back after a successful :meth:`enter`.

        If the caller scheduled callbacks on the loop meanwhile (a future it
        completed, a timer), the loop thread is woken to run them. A Ctrl-C held
        meanwhile is delivered last (`KeyboardInterrupt` raised here): the caller
        does what must follow its work with the loop before it leaves.
        """
        loop = self._loop
        stray, loop.stray, loop.guest = loop.stray, False, False
        held, self._held = self._held, None
        self._guest = None
        self._busy.release()
        if stray:
            with contextlib.suppress(RuntimeError):  # closed: nothing left to run
                loop.call_soon_threadsafe(_nothing)
        if held is not None:
            held.__exit__(None, None, None)

    @property
    def interrupt_pending(self) -> bool:
        """In the loop's place (`enter`): a signal is held, to be raised by `leave`
        (a wait there should end soon)."""
        held = self._held
        return held is not None and held.pending

    @property
    def stray(self) -> bool:
        """In the loop's place (`enter`): a callback was scheduled meanwhile, which
        the loop thread runs once given the loop back (`leave`)."""
        return self._loop.stray

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> asyncio.Handle:
        """Schedule ``fn(*args)`` on the loop; safe from any thread."""
        return self._loop.call_soon_threadsafe(fn, *args)

    def run_sync(
        self,
        coro_fn: Callable[..., Awaitable[T]],
        *args: Any,
        timeout: float | None = None,
    ) -> T:
        """Run ``await coro_fn(*args)`` on the loop and block until it finishes.

        Parameters
        ----------
        coro_fn:
            An async function (or any callable returning an awaitable); it is
            called on the loop thread.
        *args:
            Positional arguments for ``coro_fn``.
        timeout:
            Seconds to wait, or None to wait for ever. On timeout (or if the
            waiting thread is interrupted) the task is cancelled.

        Returns
        -------
        The coroutine's result; its exception is raised here instead.

        Raises
        ------
        RuntimeError
            If called from the loop thread (waiting there would deadlock), or
            after the runner was released.
        TimeoutError
            If ``timeout`` expired first.
        concurrent.futures.CancelledError
            If the task was cancelled, for example because the loop stopped.
        """
        if self.in_loop_thread():
            raise RuntimeError(
                f"run_sync({_name(coro_fn)}) was called from the dispynb I/O thread, "
                "where waiting would deadlock; await the coroutine instead"
            )
        if self._released:
            raise RuntimeError("run_sync() called on a released LoopRunner")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        task: asyncio.Future[T] | None = None

        def start() -> None:
            nonlocal task
            if not future.set_running_or_notify_cancel():
                return  # the caller gave up before we started
            try:
                task = asyncio.ensure_future(coro_fn(*args))
            except Exception as exc:
                future.set_exception(exc)
                return
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda t: _copy_outcome(t, future))

        def cancel() -> None:
            if task is not None:
                task.cancel()

        # Waited for on a lock of its own, not in future.result(): a Ctrl-C there
        # may break the future's lock for the loop thread setting it (`Sleepers`).
        finished = threading.Lock()
        finished.acquire()
        future.add_done_callback(lambda _future: finished.release())
        ident = threading.get_ident()
        with self._waits_lock:
            self._waits[ident] = (future, cancel)
        self._loop.call_soon_threadsafe(start)
        try:
            if not acquire_interruptibly(finished, timeout):
                raise concurrent.futures.TimeoutError
            return future.result(0)
        except concurrent.futures.CancelledError:
            with self._waits_lock:
                interrupted = future in self._interrupted
            if interrupted:
                raise KeyboardInterrupt(
                    f"{_name(coro_fn)} was interrupted from another thread"
                ) from None
            raise
        except concurrent.futures.TimeoutError:
            self._abandon(future, cancel)
            raise TimeoutError(
                f"{_name(coro_fn)} did not finish within {timeout} s"
            ) from None
        except BaseException:
            # KeyboardInterrupt in a notebook: stop the work we started, re-raise.
            if not future.done():
                self._abandon(future, cancel)
            raise
        finally:
            with self._waits_lock:
                if self._waits.get(ident, (None, None))[0] is future:
                    del self._waits[ident]
                self._interrupted.discard(future)

    def interrupt(self, ident: int) -> bool:
        """Interrupt the `run_sync` call that thread ``ident`` waits in, as Ctrl-C
        interrupts the main thread's: its work is cancelled and the call raises
        `KeyboardInterrupt` in that thread (whose cleanup then runs as usual).

        For a thread that makes a cluster for another (a probe of ``%dispy
        nodes``) when that one is interrupted. Returns False if the thread waits
        in no call now (nothing was done).
        """
        with self._waits_lock:
            entry = self._waits.pop(ident, None)
            if entry is None:
                return False
            future, cancel = entry
            self._interrupted.add(future)
        self._abandon(future, cancel)
        return True

    def _abandon(
        self, future: concurrent.futures.Future[Any], cancel: Callable[[], None]
    ) -> None:
        """Cancel a run_sync call whose caller stopped waiting."""
        if not future.cancel() and not self._loop.is_closed():
            # If the loop closed meanwhile, its shutdown already cancelled the task.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(cancel)

    def _run(self) -> None:
        """Body of the loop thread."""
        self._ident = threading.get_ident()
        asyncio.set_event_loop(self._loop)
        self._busy.acquire()
        try:
            self._loop.call_soon(self._started.set)
            self._loop.run_forever()
        finally:
            try:
                self._shutdown()
            finally:
                asyncio.set_event_loop(None)
                self._loop.close()
                self._busy.release()

    def _shutdown(self) -> None:
        """Cancel what is left on the stopped loop and wait for it, like asyncio.run."""
        loop = self._loop
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                logger.error(
                    "Task %r raised while the I/O loop was stopping",
                    task,
                    exc_info=task.exception(),
                )
        tlslink = sys.modules.get("dispynb.transport.tlslink")  # imported if ever used
        if tlslink is not None:
            tlslink.cut_closing_tls_links(loop)  # closed by the runs below
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())

    @classmethod
    def _forget_after_fork(cls) -> None:
        """In a forked child the loop thread does not exist: start afresh on demand.

        If a thread had the loop's place (`enter`) when another one forked, the
        child's Ctrl-C goes back to its own handler: it has no thread to `leave`.
        """
        runner = cls._instance
        held = runner._held if runner is not None else None
        if held is not None:
            held.drop()
        cls._instance = None
        cls._refcount = 0
        cls._class_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=LoopRunner._forget_after_fork)


def _nothing() -> None:
    """A callback that only wakes the loop."""


class _GuestLoop(asyncio.SelectorEventLoop):
    """The runner's loop: notes callbacks scheduled by a thread that took its place
    (`LoopRunner.enter`), so that `LoopRunner.leave` wakes the loop thread for them."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        super().__init__(selector)
        self._pool = _ExitProofExecutor(thread_name_prefix="dispynb-pool")
        self.set_default_executor(self._pool)
        self.guest = False  # another thread has the loop (`LoopRunner.enter`)
        self.stray = False  # ... and scheduled a callback meanwhile

    async def shutdown_default_executor(self, *timeout: Any) -> None:
        """As asyncio's (``timeout`` since Python 3.12), which waits for the pool
        in a new thread; where none can start, in the loop's own: Python 3.12.0
        and 3.12.1 start none at interpreter exit, where a script's last cluster
        closes (its pool idle by then: ``threading`` shut it down before the exit
        functions ran)."""
        try:
            await super().shutdown_default_executor(*timeout)
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            self._pool.shutdown(wait=True)

    def call_soon(  # type: ignore[override]  # same signature as the base's
        self, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> asyncio.Handle:
        if self.guest:  # the loop thread runs no callback meanwhile: the guest's
            self.stray = True
        return super().call_soon(callback, *args, context=context)

    def call_at(  # type: ignore[override]  # same signature as the base's
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Any = None,
    ) -> asyncio.TimerHandle:
        if self.guest:
            self.stray = True
        return super().call_at(when, callback, *args, context=context)


class _ExitProofExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor (files read for nodes, host names looked up),
    still there while the interpreter exits.

    Python shuts every `ThreadPoolExecutor` down before it runs the atexit
    functions, which may still use a cluster: a job submitted at exit (from an
    atexit function, or by a callback as the main thread ends, as dispy's
    job_scheduler.py does) never had its files read: it was never sent, and its
    job() never returned. Then the call runs in the calling thread (the loop's).
    """

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        try:
            return super().submit(fn, *args, **kwargs)
        except RuntimeError:  # "cannot schedule new futures after shutdown"
            done: concurrent.futures.Future[T] = concurrent.futures.Future()
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting coroutine
                done.set_exception(exc)
            return done


class _IdleSelector(selectors.DefaultSelector):
    """The loop's selector: lets go of ``busy`` only while it waits for I/O, so
    that `LoopRunner.enter` succeeds exactly when the loop thread is idle."""

    def __init__(self, busy: threading.Lock) -> None:
        super().__init__()
        self._busy = busy

    def select(
        self, timeout: float | None = None
    ) -> list[tuple[selectors.SelectorKey, int]]:
        self._busy.release()
        try:
            return super().select(timeout)
        finally:
            self._busy.acquire()


class Coalescer:
    """Schedule ``fn()`` on the loop at most once per burst of :meth:`trigger` calls.

    ``trigger`` may be called from any thread, thousands of times per second; the
    first call of a burst costs one ``call_soon_threadsafe``, the others a flag
    test. The flag is cleared just before ``fn`` runs, so a trigger that arrives
    while ``fn`` is running schedules one more run: no wake-up is lost.

    Parameters
    ----------
    runner:
        The loop to run ``fn`` on.
    fn:
        A plain (non-async) callable; it runs on the loop thread.
    """

    __slots__ = ("_fn", "_lock", "_pending", "_runner")

    def __init__(self, runner: LoopRunner, fn: Callable[[], Any]) -> None:
        self._runner: LoopRunner = runner
        self._fn: Callable[[], Any] = fn
        self._lock: threading.Lock = threading.Lock()
        self._pending: bool = False

    def trigger(self) -> None:
        """Ask for ``fn()`` to run on the loop soon; cheap and thread-safe."""
        # Unlocked fast path: a stale False only costs a trip through the lock.
        if self._pending:
            return
        with self._lock:
            if self._pending:
                return
            self._pending = True
        try:
            self._runner.call_soon(self._run)
        except BaseException:
            self._pending = False  # let a later trigger try again, then re-raise
            raise

    def _run(self) -> None:
        self._pending = False
        try:
            self._fn()
        except Exception:
            logger.exception("Coalesced callback %s failed", _name(self._fn))


def _copy_outcome(
    task: asyncio.Future[T], future: concurrent.futures.Future[T]
) -> None:
    """Copy a finished task's result, exception or cancellation to a thread future."""
    if future.done():
        return
    if task.cancelled():
        future.cancel()
        # A RUNNING future cannot be cancelled; report the cancellation instead.
        if not future.cancelled():
            future.set_exception(concurrent.futures.CancelledError())
    elif (exc := task.exception()) is not None:
        future.set_exception(exc)
    else:
        future.set_result(task.result())


def _name(fn: Callable[..., Any]) -> str:
    """A readable name for a callable, for messages."""
    return getattr(fn, "__qualname__", None) or repr(fn)
