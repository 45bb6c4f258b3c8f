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

Callbacks given to ``add_done_callback`` never run on the I/O thread: when the
job ends there, they run on the cluster's callback thread, in order, after the
``job_status`` callbacks posted before them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Generator
from concurrent.futures._base import CANCELLED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any

from dispynb.errors import NodeLostError, RemoteError

if TYPE_CHECKING:
    from dispynb.job import DispyJob

__all__ = ["JobFuture", "outcome_error"]

logger = logging.getLogger(__name__)


class JobFuture(concurrent.futures.Future[Any]):
    """The `concurrent.futures.Future` of one `DispyJob` (``job.future``).

    ``cancel()`` follows `concurrent.futures`: a job that has not started is
    cancelled (queued on the client or waiting on a node) and True is returned; a
    job running on a node, or done, is left alone and False is returned (dispy's
    ``cluster.cancel(job)`` still terminates a running job).
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

    def __repr__(self) -> str:
        return f"<JobFuture of {self.job!r} state={self._state}>"

    def cancel(self) -> bool:
        """Cancel the job unless it runs or is done; return whether it is cancelled."""
        if not super().cancel():
            return False
        if self._notify_cancelled():
            self.job._cancel_request()
        return True

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
        super().add_done_callback(lambda future: self._dispatch(fn))

    def __await__(self) -> Generator[Any, None, Any]:
        """``await job.future``: the result, without blocking the running loop."""
        return asyncio.wrap_future(self).__await__()

    # -- driven by the job (any thread; usually the I/O thread) ---------------------

    def _dispatch(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        if self._post is not None and self._io_thread is not None and self._io_thread():
            try:
                self._post(_call_logged, fn, self)
                return
            except RuntimeError:
                pass  # the cluster closed its callback thread: run it here
        _call_logged(fn, self)

    def _mark_running(self) -> None:
        """The job started on a node: ``cancel()`` no longer stops it."""
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING

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
        error = outcome_error(job)
        try:
            if error is None:
                self.set_result(job.result)
            else:
                self.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the user while the job's end was on its way


def outcome_error(job: DispyJob) -> BaseException | None:
    """The exception a future of ``job`` (done) raises; None for ``Finished``."""
    if job.status == job.Finished:
        return None
    if job.status == job.Abandoned:
        return NodeLostError(job.exception or "the job's node was lost")
    return RemoteError.from_text(job.exception or "", status=job.status.name)


def _call_logged(fn: Callable[[Any], object], future: JobFuture) -> None:
    try:
        fn(future)
    except Exception:
        logger.exception("exception calling callback for %r", future)
