"""The user-facing job object, `DispyJob`, and its status codes; no I/O.

A `DispyJob` is created by the cluster at submit time and completed by the cluster's I/O
thread. Users read its attributes, block on it (``job()``, ``job.wait()``) or await it
(``await job``) from any thread and any asyncio loop.

Contents
--------
JobStatus
    dispy's job status numbers, as an `enum.IntEnum`.
FINAL_STATUSES
    The statuses after which a job never changes again.
DispyJob
    One job: arguments, status, result, output and timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, ClassVar

from dispynb import _interruptible
from dispynb.jobenv import TERMINATED_AT_REQUEST

if TYPE_CHECKING:
    from dispynb.futures import JobFuture
    from dispynb.node import DispyNode

__all__ = ["FINAL_STATUSES", "DispyJob", "JobStatus"]

logger = logging.getLogger("dispynb.job")


class JobStatus(enum.IntEnum):
    """Status of a `DispyJob`; the numbers are dispy's and part of the API.

    ``Cancelled < Terminated < Abandoned < Finished`` so that a priority queue of status
    notifications delivers a final status after any provisional result.
    """

    Created = 5
    Running = 6
    ProvisionalResult = 7
    Cancelled = 8
    Terminated = 9
    Abandoned = 10
    Finished = 11

    # dispy's statuses are plain ints: print them as such, in lists and with %r too.
    __repr__ = int.__repr__

    @property
    def is_final(self) -> bool:
        """Whether a job in this status never changes again."""
        return self in FINAL_STATUSES


#: Statuses after which a job never changes again.
FINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.Cancelled, JobStatus.Terminated, JobStatus.Abandoned, JobStatus.Finished}
)

#: Statuses of a job that started on a node.
_STARTED = frozenset({JobStatus.Running, JobStatus.ProvisionalResult})

# Default job ids: process-wide, starting at 1, shared by every cluster (as in dispy).
_job_ids = itertools.count(1)
# Submit order, for ``__lt__``; independent of ``id``, which users may reassign.
_submit_seq = itertools.count()
# One lock for the state changes of all jobs: critical sections are a few attribute
# writes, and a lock per job would cost memory for every job ever submitted.
_lock = threading.Lock()

#: A bare lock, the cheapest thing a thread can sleep on until another wakes it.
_new_sleeper = threading.Lock


class DispyJob:
    """A job submitted to a cluster.

    Created by ``cluster.submit(...)``; users never construct one. Every attribute below
    is read-only for users except ``id``.

    Parameters
    ----------
    job_id:
        Any object identifying the job; ``None`` takes the next value of a process-wide
        counter starting at 1.
    args, kwargs:
        The arguments the computation is called with.

    Attributes
    ----------
    id:
        The job id; users may reassign it.
    result:
        The return value (the exit code for programs), or the latest provisional result.
    stdout, stderr:
        Output of the job: ``str`` for functions, ``bytes`` for programs.
    exception:
        The formatted traceback text if the computation raised, else ``None``.
    submit_time, start_time, end_time:
        Epoch seconds; the last two come from the node: ``start_time`` when the job
        began executing there (None until then), ``end_time`` when it ended.
    status:
        A `JobStatus`; also available as ``DispyJob.Created`` ... ``DispyJob.Finished``.
        ``Created`` until the job executes on a node (also while it waits on a node
        behind other jobs), then ``Running``, ``ProvisionalResult`` and a final one.
    ip_addr:
        Address of the node the job was sent to (set at dispatch, as dispy's; None
        while it waits in the client, again if it is requeued) and that ran it.
    finish:
        A `threading.Event` set when the job reaches its final status (as in dispy,
        provisional results update ``result`` and ``status`` but do not set it).

    Examples
    --------
    >>> job = cluster.submit(21)  # doctest: +SKIP
    >>> job()  # doctest: +SKIP
    42
    >>> await job  # doctest: +SKIP
    42

    Futures: ``job.result`` and ``job.exception`` are dispy's attributes (the value,
    the traceback text), so the `concurrent.futures` methods ``result(timeout)`` and
    ``exception(timeout)`` are on ``job.future``, a real `concurrent.futures.Future`
    (see `dispynb.futures.JobFuture`). ``done()``, ``cancel()`` and
    ``add_done_callback()`` are on the job too.
    """

    __slots__ = (
        "__weakref__",  # monitors remember finished jobs without keeping results
        "_args",
        "_cluster",
        "_done",
        "_finish",
        "_future",
        "_id",
        "_key",
        "_kwargs",
        "_node",
        "_original",
        "_seq",
        "_sleepers",
        "_waiters",
        "end_time",
        "exception",
        "ip_addr",
        "result",
        "start_time",
        "status",
        "stderr",
        "stdout",
        "submit_time",
    )

    Created: ClassVar[JobStatus] = JobStatus.Created
    Running: ClassVar[JobStatus] = JobStatus.Running
    ProvisionalResult: ClassVar[JobStatus] = JobStatus.ProvisionalResult
    Cancelled: ClassVar[JobStatus] = JobStatus.Cancelled
    Terminated: ClassVar[JobStatus] = JobStatus.Terminated
    Abandoned: ClassVar[JobStatus] = JobStatus.Abandoned
    Finished: ClassVar[JobStatus] = JobStatus.Finished

    _id: Any
    result: Any
    stdout: str | bytes | None
    stderr: str | bytes | None
    exception: str | None
    submit_time: float
    start_time: float | None
    end_time: float | None
    status: JobStatus
    ip_addr: str | None
    _finish: threading.Event | None
    _args: tuple[Any, ...]
    _kwargs: dict[str, Any]
    _key: int | None
    _seq: int
    _done: bool
    # Threads blocked in `wait` or ``job()``: each sleeps on its own acquired lock,
    # which `_complete` releases (what threading.Event does underneath, without its
    # Condition's Python layers on the hot path of every result).
    _sleepers: list[threading.Lock] | None
    # A snapshot's job (`__copy__`), whose end ends the snapshot's waits; None in a job.
    _original: DispyJob | None
    # The node it ran on (its name and port tell apart nodes of one address, as
    # %dispy local's): set by the cluster as it starts or ends, unset until then.
    _node: DispyNode | None
    _cluster: Any
    _future: JobFuture | None
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] | None

    def __init__(
        self, job_id: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._id = next(_job_ids) if job_id is None else job_id
        self.result = None
        self.stdout = None
        self.stderr = None
        self.exception = None
        self.submit_time = time.time()
        self.start_time = None
        self.end_time = None
        self.status = JobStatus.Created
        self.ip_addr = None
        self._finish = None  # made when first asked for (`finish`): most never are
        self._args = args
        self._kwargs = kwargs
        self._key = None
        self._seq = next(_submit_seq)
        self._done = False
        self._sleepers = None
        self._original = None
        self._waiters = None
        self._cluster = None  # set by the cluster: job.cancel() asks it
        self._future = None

    @property
    def id(self) -> Any:
        """The job id; users may reassign it."""
        return self._id

    @id.setter
    def id(self, value: Any) -> None:
        # dispy's idiom is ``job = cluster.submit(x); job.id = x``: a cluster that
        # journals its jobs records the new id, which `recover_jobs` returns.
        self._id = value
        renamed = getattr(self._cluster, "_job_renamed", None)
        if renamed is not None:
            renamed(self)

    def __repr__(self) -> str:
        status = getattr(self.status, "name", self.status)
        return f"<DispyJob id={self.id!r} status={status}>"

    def _repr_html_(self) -> str:
        """Rich display in notebooks (`dispynb.reprs`)."""
        from dispynb.reprs import job_html

        return job_html(self)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, DispyJob):
            return NotImplemented
        return self._seq < other._seq

    # -- waiting ---------------------------------------------------------------------

    def __call__(self, clear: bool = False) -> Any:
        """Block until the job reaches its final status and return ``result``.

        Provisional results (``dispy_provisional_result``) do not end the wait: they
        reach ``job_status`` and ``cluster_status`` callbacks and ``job.result``.

        A job that failed (``Terminated``: its function raised; ``Abandoned``: its
        node was lost) returns None, as dispy's does; ``job.exception`` holds why.
        The first such call of the process logs a warning saying so, with the
        error, so that a list of results with ``None`` in it is not a mystery.

        Parameters
        ----------
        clear:
            Accepted for dispy compatibility. dispy clears ``finish`` afterwards, so
            that a second ``job()`` blocks for ever; here ``finish`` stays set once the
            job is done, and every later call returns at once.
        """
        if self._done:
            with _lock:  # `_complete` holds it while it sets the fields
                result = self.result
        else:
            try:
                self.wait()
            except KeyboardInterrupt as interrupted:  # Ctrl-C: shown at the user's call
                _interruptible.at_the_call(interrupted)  # at the user's line
                raise
            result = self.result
        if result is None and _failed(self):
            _say_failed(self)
        return result

    @property
    def finish(self) -> threading.Event:
        """dispy's ``finish`` event: set when the job reaches its final status."""
        original = self._original
        if original is not None:  # a snapshot: its job's
            return original.finish
        event = self._finish
        if event is None:
            with _lock:
                event = self._finish
                if event is None:
                    event = self._finish = threading.Event()
                    if self._done:
                        event.set()
        return event

    def __copy__(self) -> DispyJob:
        """A snapshot (what callbacks get): its ``finish`` and waits are the job's."""
        clone = DispyJob.__new__(DispyJob)
        # Made for every status a cluster_status callback gets (each submit, start
        # and end of a notebook run's jobs): getattr with a default, not a
        # suppress() per slot (18 against 3.5 us a copy).
        for name in _SLOTS:
            value = getattr(self, name, _UNSET)
            if value is not _UNSET:  # an unset slot stays unset
                setattr(clone, name, value)
        # Its waits are the job's (`wait`): none of the job's waiters are its own.
        clone._original = self._original or self
        clone._sleepers = clone._waiters = None
        return clone

    def done(self) -> bool:
        """Return whether the job reached a final status (see `FINAL_STATUSES`)."""
        return self._done

    # -- futures ---------------------------------------------------------------------

    @property
    def future(self) -> JobFuture:
        """This job as a `concurrent.futures.Future` (made on first use).

        ``job.future.result(timeout)`` returns the result or raises: `RemoteError`
        (with the remote traceback) for a job that ended ``Terminated``,
        `NodeLostError` for ``Abandoned``, ``CancelledError`` for ``Cancelled``.
        """
        from dispynb.futures import JobFuture

        return self._attach(JobFuture)

    def _attach(self, make: Callable[[DispyJob], JobFuture]) -> JobFuture:
        """The job's future, made by ``make(job)`` if it has none yet."""
        with _lock:
            future = self._future
            made = future is None
            if future is None:
                future = self._future = make(self)
            done = made and self._done
        # Exactly one of this and _complete settles it: both decide under _lock.
        if done:
            future._end()
        elif made and self.status in _STARTED:
            # _set_running writes the status, then reads _future; this wrote
            # _future, then reads the status: one of the two marks it.
            future._mark_running()
        return future

    def cancel(self) -> bool:
        """Cancel the job if it will never run (`concurrent.futures` semantics).

        Returns True if it is cancelled (it ends ``Cancelled``), False if it is
        running on a node or done. A job already sent to a node is cancelled there:
        this waits for the node to drop it (or report it started), see
        `dispynb.futures.JobFuture`. ``cluster.cancel(job)`` (dispy's) also
        terminates a running job.
        """
        return self.future.cancel()

    def add_done_callback(self, fn: Callable[[DispyJob], object]) -> None:
        """Call ``fn(job)`` once the job is done (at once if it is).

        Callbacks never run on the I/O thread: a job ending there has them run on
        the cluster's callback thread, in order.
        """
        self.future.add_done_callback(lambda _future: fn(self))

    def _cancel_request(self) -> None:
        """Cancel a job no cluster runs (recovered, or made by hand)."""
        self._complete(JobStatus.Cancelled, exception="cancelled")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a final status (provisional results do not end the wait).

        Parameters
        ----------
        timeout:
            Seconds to wait at most; ``None`` waits forever.

        Returns
        -------
        bool
            ``True`` if the job is done, ``False`` if the timeout expired first.
        """
        try:
            return self._wait(timeout)
        except KeyboardInterrupt as interrupted:  # Ctrl-C: shown at the user's call
            _interruptible.at_the_call(interrupted)  # at the user's line
            raise

    def _wait(self, timeout: float | None) -> bool:
        original = self._original
        if original is not None:  # a snapshot: its job's end ends the wait
            return original.wait(timeout)
        if self._done:
            return True
        cluster = self._cluster
        if cluster is not None and (timeout is None or timeout > 0):
            # A quick job's result is read here if the I/O loop is idle: no other
            # thread is woken for it (`dispynb._inplace`).
            wait_in_place = getattr(cluster, "_wait_in_place", None)
            if wait_in_place is not None:
                if timeout is None:
                    wait_in_place(self, None)
                else:
                    started = time.monotonic()
                    wait_in_place(self, timeout)
                    timeout = max(timeout - (time.monotonic() - started), 0.0)
        with _lock:  # `_complete` sets every field while it holds it
            if self._done:
                return True
            sleeper = _new_sleeper()
            sleeper.acquire()
            if self._sleepers is None:
                self._sleepers = []
            self._sleepers.append(sleeper)
        # Released by `_complete`; Ctrl-C interrupts this cleanly (`_interruptible`:
        # not so an Event's wait), and the sleeper left behind is released then,
        # harmlessly.
        if _interruptible.acquire(sleeper, timeout):
            return True
        with _lock:
            if self._sleepers is not None and sleeper in self._sleepers:
                self._sleepers.remove(sleeper)
            return self._done

    def __await__(self) -> Generator[Any, None, Any]:
        """Wait, without blocking the loop, for a final status; then return ``result``.

        Works from any asyncio loop in any thread: the cluster's thread wakes the
        waiter with ``loop.call_soon_threadsafe``. A job that failed gives None, as
        ``job()`` does, and so does the warning the first time.
        """
        original = self._original
        if original is not None:  # a snapshot: its job's end ends the wait
            yield from original.__await__()
        elif not self._done:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            waiter = (loop, future)
            with _lock:
                registered = not self._done
                if registered:
                    if self._waiters is None:
                        self._waiters = []
                    self._waiters.append(waiter)
            if registered:
                try:
                    yield from future.__await__()
                finally:
                    self._forget(waiter)
        result = self.result
        if result is None and _failed(self):
            _say_failed(self)  # as job() does
        return result

    def _forget(self, waiter: tuple[asyncio.AbstractEventLoop, Any]) -> None:
        """Drop a waiter that is done or was cancelled (as by ``asyncio.wait_for``)."""
        with _lock:
            if self._waiters and waiter in self._waiters:
                self._waiters.remove(waiter)

    # -- state changes, called by the cluster's I/O thread ---------------------------

    def _set_running(self, ip_addr: str, start_time: float | None = None) -> bool:
        """Mark the job as executing on the node at ``ip_addr`` since ``start_time``
        (the node's clock; default now); ignored once done."""
        with _lock:  # against `_mark_cancelled` on a user's thread
            if self._done or self.status is JobStatus.Cancelled:
                return False
            self.ip_addr = ip_addr
            self.start_time = time.time() if start_time is None else start_time
            self.status = JobStatus.Running
        if self._future is not None:
            self._future._mark_running()
        return True

    def _set_provisional(self, result: Any) -> bool:
        """Store a provisional result (``finish`` waits for the final status);
        ignored once done. A cancelled job still running may send one (from its
        KeyboardInterrupt handler): as in dispy, it is ``ProvisionalResult`` again."""
        with _lock:
            if self._done:
                return False
            self.result = result
            self.status = JobStatus.ProvisionalResult
        return True

    def _mark_cancelled(self) -> bool:
        """Show the job ``Cancelled`` from the moment it is cancelled, as dispy does
        (it still ends as its engine reports: ``Terminated`` once its node stops
        it; a start reported later is ignored). Returns False if it is done or
        already cancelled."""
        with _lock:
            if self._done or self.status is JobStatus.Cancelled:
                return False
            self.status = JobStatus.Cancelled
            return True

    def _requeue(self) -> bool:
        """Put a job back to ``Created`` to run it elsewhere (reentrant jobs)."""
        if self._done:
            return False
        self.status = JobStatus.Created
        self.ip_addr = None
        self.start_time = None
        return True

    def _complete(
        self,
        status: JobStatus,
        result: Any = None,
        stdout: str | bytes = "",
        stderr: str | bytes = "",
        exception: str | None = None,
        start_time: float | None = None,
        end_time: float | None = None,
        ip_addr: str | None = None,
    ) -> bool:
        """Give the job its final status, set ``finish`` and wake every waiter.

        Returns ``False``, changing nothing, if the job is already done: a late
        result, or a cancel racing a result, is applied at most once.
        ``start_time`` and ``ip_addr`` keep their values when not given;
        ``end_time`` defaults to now.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final job status")
        with _lock:
            if self._done:
                return False
            self._done = True
            self.result = result
            self.stdout = stdout
            self.stderr = stderr
            self.exception = exception
            if start_time is not None:
                self.start_time = start_time
            self.end_time = time.time() if end_time is None else end_time
            if ip_addr is not None:
                self.ip_addr = ip_addr
            # A JobStatus already (the usual case): no enum lookup per job.
            self.status = status if type(status) is JobStatus else JobStatus(status)
            if self._finish is not None:  # a user's thread may wait on it
                _interruptible.set_event(self._finish)
            sleepers, self._sleepers = self._sleepers, None
            waiters, self._waiters = self._waiters, None
            job_future, self._cluster = self._future, None
        if sleepers is not None:
            for sleeper in sleepers:
                sleeper.release()
        if waiters:
            for loop, future in waiters:
                # A closed loop raises RuntimeError: nobody is left there to wake.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_wake, future)
        if job_future is not None:
            job_future._end()
        return True


#: Final statuses of a job that failed: ``job()`` returns None for them.
_FAILED = frozenset({JobStatus.Terminated, JobStatus.Abandoned})
# Whether `_say_failed` has said it: once a process, the lesson is learned.
_failure_said = False


def _failed(job: DispyJob) -> bool:
    """Whether ``job`` failed: ended `_FAILED`, but not terminated because its
    program asked (`JobCluster.cancel` of a running job, ``close(terminate=True)``),
    which is no news to it."""
    return job.status in _FAILED and job.exception != TERMINATED_AT_REQUEST


def _say_failed(job: DispyJob) -> None:
    """Warn, the first time in this process, that ``job()`` of a failed job returned
    None: dispy's contract, which otherwise leaves a newcomer's ``[job() for job in
    jobs]`` showing ``None`` with no word of the exception behind it."""
    global _failure_said
    with _lock:
        if _failure_said:
            return
        _failure_said = True
    lines = [x.strip() for x in str(job.exception or "").splitlines() if x.strip()]
    why = f" ({lines[-1]})" if lines else ""
    if len(lines) > 1 and lines[-1].startswith("(") and lines[-1].endswith(")"):
        # Advice under the error's line (a module the node lacks): both, the error
        # first, in one parenthesis (it read "((this client imports ...))").
        why = f" ({lines[-2]}; {lines[-1][1:-1]})"
    logger.warning(
        "job %r ended %s%s: job() returns None for a job that failed, as dispy's "
        "does; job.exception holds its traceback, and job.status == "
        "DispyJob.Finished tells a result from a failure (said once)",
        job.id,
        job.status.name,
        why,
    )


#: The attributes a copy of a job takes (all but the weak-reference slot).
_SLOTS = tuple(name for name in DispyJob.__slots__ if name != "__weakref__")
_UNSET = object()


def _wake(future: asyncio.Future[None]) -> None:
    """Resolve ``future`` in its loop's thread unless it was cancelled meanwhile."""
    if not future.done():
        future.set_result(None)
