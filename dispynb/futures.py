"""`JobFuture`: a `DispyJob` seen as a `concurrent.futures.Future`.

dispy's API owns ``job.result`` (the value) and ``job.exception`` (the traceback text),
so a job cannot itself offer ``result(timeout)`` and ``exception(timeout)``. Its
``job.future`` is a real `concurrent.futures.Future` instead: ``wait``,
``as_completed``, ``asyncio.wrap_future`` and ``await`` take it, and it follows the
job to its end:

======================  ==================================================
job ends                future
======================  ==================================================
``Finished``            ``result()`` returns ``job.result``
``Terminated``          ``result()`` raises `RemoteError` (remote traceback)
``Abandoned``           ``result()`` raises `NodeLostError` (the reason)
``Cancelled``           cancelled: ``result()`` raises ``CancelledError``
======================  ==================================================

``cancel()`` keeps the `concurrent.futures` promise: it returns True only for a job
that will never run. A job still held by the client is cancelled at once. A job
already sent ahead to a node (waiting there behind others) is cancelled there, and
``cancel()`` waits for the node's answer: True once the node dropped it, False if it
had started meanwhile (it then runs to its end). For a job the node sent ahead to a
busy worker, the node answers at once while that worker's running job goes on (the
worker reads the cancel before it gets to the job); only if that job has just ended
(its result on its way) does the answer wait for the worker's own word. That wait is
bounded (`CANCEL_WAIT`; a node that stops answering is declared dead much sooner,
and the job ends ``Abandoned``). `cancel_futures` cancels many with one wait.

Callbacks given to ``add_done_callback`` never run on the I/O thread: when the
job ends there, they run on the cluster's callback thread, in order, after the
``job_status`` callbacks posted before them. Those of a future that ``cancel()``
cancels run in the thread calling it, before it returns (as ``Future.cancel()``
runs them), not behind other jobs' callbacks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures._base import (
    _STATE_TO_DESCRIPTION_MAP,
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any

from dispynb._interruptible import Sleepers
from dispynb.errors import NodeLostError, RemoteError

if TYPE_CHECKING:
    from dispynb.job import DispyJob

__all__ = ["CANCEL_WAIT", "JobFuture", "cancel_futures", "outcome_error"]

logger = logging.getLogger(__name__)
#: A done-callback's exception is logged where `concurrent.futures` logs its own
#: futures' (and in its words): the logging a program set up for those covers a
#: `JobFuture`, which is one of them.
_callback_logger = logging.getLogger("concurrent.futures")

#: Seconds ``cancel()`` waits at most for the nodes holding the jobs to say whether
#: they dropped them (a node that falls silent is declared dead far sooner).
CANCEL_WAIT = 30.0

#: Seconds the I/O thread waits at most for a future's lock (`JobFuture._usable`).
STRANDED_WAIT = 2.0


class JobFuture(concurrent.futures.Future[Any]):
    """The `concurrent.futures.Future` of one `DispyJob` (``job.future``).

    ``cancel()`` follows `concurrent.futures`: True only if the job will never run.
    A job held by the client is cancelled at once; for a job waiting on a node,
    ``cancel()`` waits (at most `CANCEL_WAIT` seconds) for the node to drop it
    (True) or to report it started (False). A job running or done is left alone
    and False is returned (dispy's ``cluster.cancel(job)`` still terminates a
    running job). Called on the I/O thread (which cannot wait for a node), it
    cancels only a job the client still holds.
    """

    def __init__(self, job: DispyJob) -> None:
        super().__init__()
        #: The job this future follows.
        self.job = job
        cluster = job._cluster
        self._post: Callable[..., None] | None = (
            cluster._callbacks.post if cluster is not None else None
        )
        self._io_thread: Callable[[], bool] | None = (
            cluster._runner.in_loop_thread if cluster is not None else None
        )
        #: Set while a ``cancel()`` waits for the node's answer: it runs the
        #: callbacks if the answer cancels the future.
        self._handoff: _Handoff | None = None

    def __repr__(self) -> str:
        """As `concurrent.futures.Future`'s, naming the job. (The state is read
        without the future's lock, as in `_raise_if_cancelled`.)"""
        state = self._state
        shown = _STATE_TO_DESCRIPTION_MAP.get(state, state)
        if state == FINISHED:
            raised = self._exception
            shown += (
                f" raised {type(raised).__name__}"
                if raised is not None
                else f" returned {type(self._result).__name__}"
            )
        name = type(self).__name__
        return f"<{name} at {id(self):#x} state={shown} job={self.job.id!r}>"

    def cancel(self) -> bool:
        """Cancel the job if it will never run; return whether it is cancelled.

        It may wait for the job's node to answer (see the class's description),
        except in a thread running an asyncio loop (``asyncio.wrap_future``,
        ``run_in_executor`` and ``wait_for`` cancel from there), which it must not
        stall: there it returns at once, True only if the job is cancelled
        already; the node's answer settles the future later.
        """
        return cancel_futures([self], wait=not _in_event_loop())[0]

    def _what(self) -> str:
        """What the job is, to the user, for the error of one failed as a whole
        ("": ``job <id>``)."""
        return ""

    def _notify_cancelled(self) -> bool:
        """Tell `concurrent.futures.wait` and ``as_completed`` (as an executor does
        when it skips a cancelled item); True the first time only."""
        with self._condition:
            if self._state != CANCELLED:
                return False
            self.set_running_or_notify_cancel()
            return True

    def add_done_callback(
        self, fn: Callable[[concurrent.futures.Future[Any]], object]
    ) -> None:
        """Call ``fn(future)`` when the job ends (at once if it has ended).

        A job ending on the I/O thread has ``fn`` run on the cluster's callback
        thread instead, so a slow or blocking callback cannot stall the I/O.
        """
        # As Future.add_done_callback, with the lock's own ``with`` (C code), not
        # the Condition's (Python): a Ctrl-C landing there just after the acquire
        # kept the lock for ever, and the job's end could not settle the future.
        with self._condition._lock:  # type: ignore[attr-defined]
            if self._state not in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                self._done_callbacks.append(  # type: ignore[attr-defined]
                    lambda future: self._dispatch(fn)
                )
                return
        self._dispatch(fn)  # done: now (its exceptions are logged)

    def result(self, timeout: float | None = None) -> Any:
        """As `concurrent.futures.Future.result`; the wait reads the job's answer in
        the I/O thread's place when that one is idle (`_wait_settled`)."""
        self._wait_settled(timeout)
        self._raise_if_cancelled()
        return self._Future__get_result()  # type: ignore[attr-defined]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As `concurrent.futures.Future.exception`, waiting as `result` does."""
        self._wait_settled(timeout)
        self._raise_if_cancelled()
        return self._exception

    def _raise_if_cancelled(self) -> None:
        """The outcome is read without the future's lock (settled: it no longer
        changes): ``Future.result`` takes it in ``Condition.__enter__``, Python
        code, where a Ctrl-C landing just after the acquire keeps it for ever."""
        if self._state != FINISHED:
            raise concurrent.futures.CancelledError()

    def _wait_settled(self, timeout: float | None) -> None:
        """Wait for the job to end, as ``job()`` does: when the I/O loop is idle,
        this thread reads the nodes' answers itself (`dispynb._inplace`), so that
        a quick job's answer wakes no other thread for the future. Then wait for
        the future, which the thread that ended the job settles right after (this
        one, when it read the answer), on `Sleepers`: not on the future's condition,
        whose wait a Ctrl-C may break for the I/O thread settling it.

        Raises ``TimeoutError`` if ``timeout`` seconds pass first."""
        if self._state not in (PENDING, RUNNING):  # done: nothing to wait for
            return
        end = None if timeout is None else time.monotonic() + timeout
        self.job.wait(timeout)
        left = None if end is None else max(end - time.monotonic(), 0.0)
        if not _answers.wait_for(lambda: self._state not in (PENDING, RUNNING), left):
            raise concurrent.futures.TimeoutError()

    def __await__(self) -> Generator[Any, None, Any]:
        """``await job.future``: the result, without blocking the running loop."""
        return asyncio.wrap_future(self).__await__()

    # -- driven by the job (any thread; usually the I/O thread) ---------------------

    def _dispatch(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        if self._post is not None and self._io_thread is not None and self._io_thread():
            handoff = self._handoff
            if (
                handoff is not None
                and self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)
                and handoff.take(fn, self)
            ):
                return  # the cancel() waiting for the answer runs it
            try:
                # There even sys.exit() is logged: it would end the callback thread.
                self._post(_call_logged, fn, self, BaseException)
                return
            except RuntimeError:
                pass  # the cluster closed its callback thread: run it here
        _call_logged(fn, self)

    def _mark_running(self) -> None:
        """The job started on a node: ``cancel()`` no longer stops it."""
        if self._usable():
            with self._condition:
                if self._state == PENDING:
                    self._state = RUNNING
        _answered()

    def _end(self) -> None:
        """The job ended: settle the future, and wake a ``cancel()`` waiting."""
        try:
            if self._usable():
                self._settle()
        finally:
            handoff = self._handoff
            if handoff is not None:
                handoff.settled.add(id(self))
            _answered()

    def _usable(self) -> bool:
        """Whether the future's lock can be had: False (logged) if another thread
        keeps it for `STRANDED_WAIT` seconds. Python's ``concurrent.futures.wait``
        and ``as_completed``, when Ctrl-C lands as they take the locks of the
        futures, keep those taken for ever; the I/O thread, which settles
        futures, would then hang with every job of the cluster."""
        if self._condition.acquire(timeout=STRANDED_WAIT):
            self._condition.release()
            return True
        logger.error(
            "the future of job %r is left unsettled: its lock has been held for "
            "%s s (a concurrent.futures.wait or as_completed on it interrupted by "
            "Ctrl-C keeps it for ever); job.result and job() still have its outcome",
            self.job.id,
            STRANDED_WAIT,
        )
        return False

    def _settle(self) -> None:
        """Give the future the job's final outcome (called once, when it ends)."""
        job = self.job
        if job.status == job.Cancelled:
            with self._condition:
                if self._state == RUNNING:  # started, then handed back: not run
                    self._state = PENDING  # (Future.cancel() refuses RUNNING)
            if super().cancel():
                self._notify_cancelled()
            return
        error = outcome_error(job, self._what())
        try:
            if error is None:
                self.set_result(job.result)
            else:
                self.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the user while the job's end was on its way
        except RuntimeError:
            # A user's wait on the future (``concurrent.futures.wait``) broken by
            # Ctrl-C let its event's lock go while set_result held it (see
            # `Sleepers`): the outcome is set, but some waiters may not be woken,
            # nor callbacks run.
            with self._condition:
                self._condition.notify_all()
            self._invoke_callbacks()  # type: ignore[attr-defined]  # Future's own


def cancel_futures(
    futures: Iterable[concurrent.futures.Future[Any]], wait: bool = True
) -> list[bool]:
    """Cancel each future (as its ``cancel()``), with one wait for all the nodes'
    answers instead of one per job; returns what each ``cancel()`` would have.

    ``wait=False`` sends the cancels and returns at once: the jobs waiting on a
    node end cancelled (or run) later, and the list says only which futures are
    cancelled already. A node may answer for a job sent ahead to a busy worker
    only once that worker's running job ends (if it has just ended), so callers
    that must not block (a map's timeout, ``shutdown(wait=False)``, an interrupt)
    do not wait.
    Futures of other kinds are cancelled as they cancel themselves.
    """
    futures = list(futures)
    waiting: list[JobFuture] = []
    handoff = _Handoff() if wait else None
    by_cluster: dict[int, tuple[Any, list[DispyJob]]] = {}
    for future in futures:
        if not isinstance(future, JobFuture):
            future.cancel()
            continue
        # Read without the future's lock (a Condition: a Ctrl-C landing in its
        # Python __enter__ just after the acquire would keep the lock for ever,
        # and the job's end could not settle the future); the nodes decide.
        if future._state != PENDING:
            continue
        job = future.job
        cluster = job._cluster
        if cluster is None:  # not submitted through a cluster: nothing runs it
            job._cancel_request()
            continue
        by_cluster.setdefault(id(cluster), (cluster, []))[1].append(job)
        waiting.append(future)
        future._handoff = handoff
    try:
        sent = False
        for cluster, jobs in by_cluster.values():
            if cluster._cancel_unstarted(jobs):
                sent = True
        if sent and handoff is not None:
            _wait_answers(waiting, handoff, CANCEL_WAIT)
    except BaseException:  # Ctrl-C: the callbacks handed over run on their thread
        if handoff is not None:
            handoff.finish(waiting, run=False)
        raise
    if handoff is not None:
        handoff.finish(waiting, run=True)
    return [
        future._state in (CANCELLED, CANCELLED_AND_NOTIFIED)
        if isinstance(future, JobFuture)
        else future.cancelled()
        for future in futures
    ]


# ``cancel()`` waits for the jobs it asked nodes about on sleepers shared by all
# futures (not each future's own: ``Future.result(timeout)`` gives up at its first
# wake-up, and a Condition's wait interrupted by Ctrl-C may break the I/O thread's
# next notify, see `Sleepers`). Jobs wake them only while someone waits (the hot
# path pays a read): a waiter registers before it checks the futures' states, a job
# sets its state before it looks, so no wake-up is missed.
_answers = Sleepers()


def _answered() -> None:
    """A job started or ended: wake the ``cancel()`` calls waiting (if any)."""
    _answers.wake_all()


class _Handoff:
    """The callbacks of the futures one waiting ``cancel()`` cancels: the I/O
    thread, settling them, hands them here instead of to the callback thread,
    and the cancelling thread runs them before it returns, as
    ``Future.cancel()`` runs a future's callbacks in its caller's thread. So
    ``cancel()`` waits for no other job's callback (one may be waiting for a
    lock the cancelling thread holds), nor for itself when a callback cancels.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True
        self._calls: list[tuple[Callable[[Any], object], JobFuture]] = []
        #: ids of the futures settled meanwhile (their callbacks handed over).
        self.settled: set[int] = set()

    def take(self, fn: Callable[[Any], object], future: JobFuture) -> bool:
        """Keep ``fn(future)`` for the cancelling thread; False if it is gone."""
        with self._lock:
            if self._open:
                self._calls.append((fn, future))
            return self._open

    def finish(self, futures: list[JobFuture], run: bool) -> None:
        """The wait is over: run the callbacks handed over (``run``), or, the
        cancel interrupted, post them to their callback thread."""
        with self._lock:
            self._open = False
            calls, self._calls = self._calls, []
        for future in futures:
            if future._handoff is self:
                future._handoff = None
        for fn, future in calls:
            if run or future._post is None:
                _call_logged(fn, future)
            else:
                try:
                    future._post(_call_logged, fn, future, BaseException)
                except RuntimeError:  # the cluster closed its callback thread
                    _call_logged(fn, future)


def _wait_answers(futures: list[JobFuture], handoff: _Handoff, timeout: float) -> None:
    """Wait until each future of ``futures`` has started, ended, or been
    cancelled and settled (its callbacks handed over), or ``timeout`` passes."""

    def answered(future: JobFuture) -> bool:
        state = future._state
        if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            return id(future) in handoff.settled
        return state != PENDING

    _answers.wait_for(lambda: all(answered(f) for f in futures), timeout)


def _in_event_loop() -> bool:
    """Whether this thread is running an asyncio event loop now."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def outcome_error(job: DispyJob, what: str = "") -> BaseException | None:
    """The exception a future of ``job`` (done) raises; None for ``Finished``.
    One that failed as a whole is named by ``what`` (default ``job <id>``) and
    its node; one abandoned (`NodeLostError`) by ``what``, then the reason."""
    if job.status == job.Finished:
        return None
    where = what or f"job {job.id!r}"
    if job.status == job.Abandoned:  # the reason names the node
        reason = job.exception or "the job's node was lost"
        return NodeLostError(f"{where} did not finish: {reason}")
    if job.ip_addr:
        where += f" on node {job.ip_addr}"
    return RemoteError.from_text(
        job.exception or "", status=job.status.name, where=where
    )


def _call_logged(
    fn: Callable[[Any], object],
    future: JobFuture,
    logged: type[BaseException] = Exception,
) -> None:
    """``fn(future)``, its ``logged`` exceptions logged as `concurrent.futures`
    logs a callback's (in the caller's thread, as there, a SystemExit goes on)."""
    try:
        fn(future)
    except logged:
        _callback_logger.exception("exception calling callback for %r", future)
