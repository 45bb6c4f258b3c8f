"""The Dask engine's jobs: submitted as Dask tasks, their events from the workers
(start, provisional results, files, small outcomes), their other results gathered in
batches, their cancels, and the failures that abandon them."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import re
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from dispynb.backends._daskstate import _as_bytes, _DaskState, logger
from dispynb.backends.base import JobRequest, Outcome
from dispynb.backends.jobfiles import save_job_file
from dispynb.errors import DispynbError, NotSupportedError, SerializationError
from dispynb.job import JobStatus
from dispynb.jobenv import TERMINATED_AT_REQUEST
from dispynb.protocol import serialize

#: Bytes of pickled arguments up to which a job submitted from another thread is
#: submitted to Dask on the loop with the others of its burst (see `_Jobs.submit`).
SMALL_PAYLOAD = 64 << 10


class _Jobs(_DaskState):
    """The jobs' way through Dask, from ``submit`` to their final event."""

    # -- events from the workers (on the loop) ---------------------------------------

    def _on_event(self, event: tuple[float, Any]) -> None:
        message = event[1]
        if not isinstance(message, list | tuple) or not message:
            return  # the scheduler's own events on this client's topic
        kind = message[0]
        if kind == "ready":
            self._worker_ready(*message[1:])
        elif kind == "start":
            _, dask_key, address, start_time = message
            key = self._key_of(dask_key)
            if key is not None and key not in self.started:
                node = self._node(address)
                self.started[key] = (node, start_time)
                self.running[address].add(key)
                self.events.job_running(key, node, start_time)
        elif kind == "provisional":
            _, dask_key, address, data = message
            key = self._key_of(dask_key)
            if key is None:
                return
            try:
                result = serialize.loads(pickle.loads(data), self.result_types)
            except DispynbError as exc:
                logger.warning("provisional result of job %d dropped: %s", key, exc)
                return
            node = self._node(address)
            if key not in self.started:
                self.started[key] = (node, event[0])
                self.events.job_running(key, node, event[0])
            self.received[address] += len(data)
            self.events.job_provisional(key, node, result)
        elif kind == "done":  # a small outcome, before Dask's task-finished
            _, dask_key, data = message
            key = self._key_of(dask_key)
            future = self.futures.get(key) if key is not None else None
            if future is not None and future.key == dask_key:
                self.pushed[dask_key] = data
        elif kind == "file":
            self._job_file(*message[1:])

    def _job_file(
        self, dask_key: str, path: str, data: bytes, address: str, request: int
    ) -> None:
        """A job sent a file: save it, and answer the job that waits for it
        (``request`` not 0) on its worker (`_daskworker.answer_file`)."""
        key = self._key_of(dask_key)
        if key is None:
            error = "the client no longer runs its job"
        else:
            seen = self.started.get(key)
            if seen is not None:
                self.received[seen[0].node_id] += len(data)
            error = save_job_file(
                self.files_dir, key, path, data, logger=logger, node=address
            )
        if request and self.client is not None:
            from dispynb.backends._daskworker import answer_file

            answer = self.client.run(
                answer_file, self.plugin_name, dask_key, request, error,
                workers=[address],
            )  # fmt: skip
            asyncio.ensure_future(answer).add_done_callback(_unanswered)

    # -- jobs ---------------------------------------------------------------------

    def prepare(self, job: JobRequest) -> None:
        """Pickle the job's arguments (in the caller's thread) into ``job.payload``."""
        if job.depends:
            raise NotSupportedError(
                "dispy_job_depends is not supported on the 'dask' engine: put the "
                "objects in the cluster's depends, or use engine=None"
            )
        try:
            job.payload = [
                _as_bytes(b) for b in serialize.dumps((job.args, job.kwargs))
            ]
        except SerializationError as exc:
            raise SerializationError(
                serialize.unsendable_arguments(
                    job.args, job.kwargs, exc, "a Dask worker"
                )
            ) from exc
        # Only what names Dask's Future class is looked through (one memchr).
        if b"distributed.client" in job.payload[0] and _holds_future(
            (job.args, job.kwargs)
        ):
            job.payload = None
            raise NotSupportedError(
                "a Dask Future (of client.scatter or client.submit) cannot be a "
                "dispynb job's argument: the job would get the Future, not its "
                "value; pass the value itself (it travels with the job), or have "
                "setup load a large object once per worker into a global the jobs "
                "read"
            )

    def submit(self, job: JobRequest) -> None:
        """Queue a prepared job on Dask; never blocks.

        From a user's thread, a job with small arguments (up to `SMALL_PAYLOAD`
        bytes pickled) is handed to the loop, which submits the jobs handed since
        its last turn together: one loop wake-up per burst of submits, where each
        ``Client.submit`` from another thread wakes Dask's loop (ours) itself, and
        so would the job's bookkeeping (W1: three wake-ups per job counting the
        future's release, each a GIL hand-over between the two threads). A job
        with larger arguments is submitted on the user's thread, as a Dask
        client's own users do: ``Client.submit`` pickles the task, arguments
        included (a copy of each large one); done on the loop, a batch of large
        jobs would hold the loop up until the last one is pickled, so none would
        travel before all of them were ready. Its bookkeeping is handed over as a
        small job's.
        """
        if getattr(job, "payload", None) is None:
            self.prepare(job)
        limits = (job.timeout, job.mem_limit)
        size = self.sizes[job.key] = sum(len(b) for b in job.payload)
        if self.runner.in_loop_thread():
            self._take_handed()  # after the jobs other threads handed over
            self._submit(job.key, job.payload, job.node_id, limits)
            return
        if size <= SMALL_PAYLOAD:
            self.handed.append((job.key, job.payload, job.node_id, limits))
        else:
            try:
                future = self._task(job.key, job.payload, job.node_id, limits)
            except Exception as exc:  # the client closed meanwhile
                self.runner.call_soon(self._not_sent, job.key, exc)
                return
            self.handed.append((job.key, future))
        self.take_handed.trigger()

    def _take_handed(self) -> None:
        """On the loop: submit or track the jobs other threads handed over, in
        their order."""
        handed = self.handed
        while handed:
            item = handed.popleft()
            if len(item) == 2:
                self._track(*item)
            else:
                self._submit(*item)

    def _submit(
        self,
        key: int,
        buffers: list[bytes],
        node_id: str | None,
        limits: tuple[float | None, int | None],
    ) -> None:
        try:
            future = self._task(key, buffers, node_id, limits)
        except Exception as exc:
            self._not_sent(key, exc)
            return
        self._track(key, future)

    def _task(
        self,
        key: int,
        buffers: list[bytes],
        node_id: str | None,
        limits: tuple[float | None, int | None],
    ) -> Any:
        """The job as a Dask task; its Dask future, or None if the cluster closed.

        Any thread: it reads the workers' state the loop keeps (a dict's keys copied
        at once), and ``Client.submit`` is safe from any thread.
        """
        from dispynb.backends._daskworker import run_job

        client = self.client
        if self.closed or client is None:
            return None
        kind = "r" if self.reentrant else "n"
        dask_key = f"{self.prefix}{kind}{key}-{next(self.attempts)}"
        workers: list[str] | None = [node_id] if node_id else self._restriction()
        if not node_id and self.failed:
            workers = list(self.workers) or workers  # not where setup failed
        with _no_large_graph_warning(sum(len(b) for b in buffers)):
            return client.submit(
                run_job,
                self.plugin_name,
                limits,
                *buffers,
                key=dask_key,
                pure=False,
                workers=workers,
                allow_other_workers=False,
            )

    def _track(self, key: int, future: Any) -> None:
        """Watch a submitted job's future (on the loop)."""
        if future is None or self.closed:
            if future is not None and self.client is not None:
                cancel = self.client.cancel([future], reason="dispynb: closed")
                asyncio.ensure_future(cancel).add_done_callback(_log_failure)
            self.sizes.pop(key, None)
            self.events.job_cancelled(key)
            return
        self.futures[key] = future
        task = asyncio.ensure_future(self._watch(key, future))
        task.add_done_callback(_log_failure)

    def _not_sent(self, key: int, error: Exception) -> None:
        """Dask refused the task (its client closed under the job): abandoned."""
        self.sizes.pop(key, None)
        if self.closed:
            self.events.job_cancelled(key)
            return
        reason = f"the job could not be sent to Dask: {type(error).__name__}: {error}"
        self.events.job_abandoned(key, None, reason)

    async def _watch(self, key: int, future: Any) -> None:
        await _settled(future)
        pushed = self.pushed.pop(future.key, None)
        if key not in self.futures or self.futures[key] is not future:
            return  # cancelled or abandoned here already
        if future.status == "finished" and pushed is not None:
            del self.futures[key]
            try:
                value = pickle.loads(pushed)  # from our computation's worker
            except Exception as error:
                value = error
            self._report(key, value)
            return
        if future.status == "finished":
            self.finished.append((key, future))
            if not self.gathering:
                self.gathering = True
                asyncio.ensure_future(self._gather()).add_done_callback(_log_failure)
            return
        self.futures.pop(key, None)
        seen = self.started.get(key)
        self._forget(key)
        if future.status == "cancelled":  # not by this cluster: it popped its own
            reason = (
                f"the connection to the Dask scheduler at {self.engine.address} was "
                "lost"
                if self.client is None or self.client.status != "running"
                else "the Dask scheduler cancelled it (restarted, or another client "
                "cancelled it)"
            )
        else:
            reason = f"the Dask task failed ({future.status})"
            with contextlib.suppress(Exception):
                exc = await future.exception()
                if exc is not None:
                    reason = f"{type(exc).__name__}: {exc}"
        self.events.job_abandoned(key, seen[0] if seen else None, reason)

    async def _gather(self) -> None:
        """Fetch finished results in batches (one scheduler round trip each)."""
        try:
            while self.finished:
                batch, self.finished = self.finished, []
                try:
                    values = await self.client.gather([f for _, f in batch])
                except Exception:
                    values = []
                    for _, future in batch:
                        try:
                            values.append(await future)
                        except Exception as exc:
                            values.append(exc)
                for (key, future), value in zip(batch, values, strict=True):
                    if key in self.futures and self.futures[key] is future:
                        del self.futures[key]
                        self._report(key, value)
        finally:
            self.gathering = False

    def _report(self, key: int, value: Any) -> None:
        if isinstance(value, BaseException):
            self._forget(key)
            self.events.job_abandoned(key, None, f"{type(value).__name__}: {value}")
            return
        meta, result_buffers, address = value
        outcome, start, end, stdout, stderr, exception = meta
        self.sent[address] += self.sizes.pop(key, 0)
        self.received[address] += sum(memoryview(b).nbytes for b in result_buffers)
        for text in (stdout, stderr, exception):
            self.received[address] += len(text) if text else 0
        node = self._node(address)
        seen = self.started.pop(key, None)
        self.running[address].discard(key)
        self.lost.pop(key, None)
        if outcome == "setup":
            sources = self.config.sources  # the user's files and lines, as locally
            if sources is not None:
                exception = sources.rerender(exception) or exception
            self.events.job_abandoned(
                key, node, f"setup failed on Dask worker {address}: {exception}"
            )
            return
        if seen is None:
            self.events.job_running(key, node, start)
        status = JobStatus.Terminated
        result = None
        if outcome == "finished":
            try:
                result = serialize.loads(result_buffers, self.result_types)
                status = JobStatus.Finished
            except DispynbError as exc:
                exception = f"the result cannot be unpickled here: {exc}\n"
        self.events.job_done(
            key,
            node,
            Outcome(status, result, stdout, stderr, exception, start, end),
        )

    def traffic(self, node_id: str) -> tuple[int, int]:
        """Bytes sent to and received from the worker ``node_id``: the jobs' pickled
        arguments and the files sent; the jobs' results, output (characters),
        provisional results and files. Dask's own messages are not counted."""
        return self.sent.get(node_id, 0), self.received.get(node_id, 0)

    def cancel(
        self, keys: list[int], unstarted: bool = False, held: bool = False
    ) -> None:
        """Cancel jobs: Dask drops queued ones and the workers kill running ones.

        ``unstarted``: leave the jobs known to run alone (their start is announced
        after `_daskworker.START_REPORT`; a job cancelled within that time of its
        start is killed and reported ``Cancelled``). ``held``: the same (Dask holds
        the queue, this client none), reported before this returns.
        """
        if self.runner.in_loop_thread():
            self._cancel(keys, unstarted or held)
        else:
            self.runner.call_soon(self._cancel, keys, unstarted or held)

    def _cancel(self, keys: list[int], unstarted: bool = False) -> None:
        self._take_handed()  # a job handed over but not yet taken is cancelled too
        futures = []
        for key in keys:
            if unstarted and key in self.started:
                continue
            future = self.futures.pop(key, None)
            if future is None:
                continue
            futures.append(future)
            seen = self.started.pop(key, None)
            self.lost.pop(key, None)
            size = self.sizes.pop(key, 0)
            if seen is None:
                self.events.job_cancelled(key)
                continue
            node, start = seen
            self.running[node.node_id].discard(key)
            self.sent[node.node_id] += size
            outcome = Outcome(
                JobStatus.Terminated,
                exception=TERMINATED_AT_REQUEST,
                start_time=start,
            )
            self.events.job_done(key, node, outcome)
        if futures and self.client is not None:
            # One Client.cancel per loop turn: Stop cancels job by job, and the
            # scheduler must drop the queued ones in the same step as it frees the
            # running ones' workers, or the queue moves up first.
            if not self.cancelling:
                asyncio.get_running_loop().call_soon(self._flush_cancels)
            self.cancelling += futures

    def _flush_cancels(self) -> None:
        futures, self.cancelling = self.cancelling, []
        if futures and self.client is not None:
            cancel = self.client.cancel(futures, reason="dispynb: cancelled")
            asyncio.ensure_future(cancel).add_done_callback(_log_failure)


@contextlib.contextmanager
def _no_large_graph_warning(size: int) -> Iterator[None]:
    """Dask's "Sending large graph" warning ignored, in this thread only, while a
    job of ``size`` bytes of arguments is submitted, if that many may raise it.

    Its advice does not apply to a job: load the data with Dask (the job's
    arguments are the user's values, sent once), or pass futures / scatter it
    (dispynb refuses a Future as an argument, and a scattered value would be lost
    with its worker: Dask could not run the job again elsewhere, as it does when
    the arguments travel in the task). Not ``catch_warnings``: before Python
    3.14 it swaps the process's filters, so another thread's own large-graph
    warning would be ignored too, and a filter it added meanwhile dropped. One
    filter of ours is added instead (it matches only this thread's warning) and
    removed after; only for a job that large, the config read too.
    """
    if size <= SMALL_PAYLOAD:  # no config read per small job (the hot path)
        yield
        return
    import dask.config
    from dask.utils import parse_bytes

    threshold = dask.config.get("distributed.admin.large-graph-warning-threshold")
    if size < parse_bytes(threshold) // 2:  # the task's other bytes are far fewer
        yield
        return
    # An "ignore" filter leaves nothing in the modules' warning registries, so it
    # may come and go without invalidating them.
    ours = ("ignore", _InThisThread("Sending large graph"), UserWarning, None, 0)
    warnings.filters.insert(0, ours)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # another thread's catch_warnings
            warnings.filters.remove(ours)  # type: ignore[attr-defined]


class _InThisThread:
    """A warnings filter's message pattern: ``pattern`` at the start of a warning
    raised by the thread that made it (filters call their pattern's ``match``)."""

    def __init__(self, pattern: str) -> None:
        self._pattern = re.compile(pattern)
        self._thread = threading.get_ident()

    def match(self, text: str) -> bool:
        return threading.get_ident() == self._thread and bool(self._pattern.match(text))


async def _settled(future: Any) -> None:
    """Wait until a Dask future is no longer pending, without fetching its result
    (what ``distributed.wait`` awaits; it needs a default client, we have none)."""
    await future._state.wait()


def _unanswered(task: asyncio.Future[Any]) -> None:
    # The worker left (its job with it), or the client closed: nobody waits.
    if not task.cancelled() and task.exception() is not None:
        logger.info("a job's file not answered: %s", task.exception())


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("Dask engine: %s", task.exception(), exc_info=task.exception())


def _holds_future(value: Any) -> bool:
    """Whether ``value`` holds a Dask ``Future`` anywhere: in containers at any
    depth, or an object's attributes (``(args, kwargs)`` of a job, or of an
    executor's job, whose calls' arguments are columns in its own). Pickled again,
    to nowhere, watching each object; only for arguments whose pickle names
    Dask's client module."""
    import cloudpickle
    from distributed import Future

    class Watch(cloudpickle.CloudPickler):  # type: ignore[misc]  # untyped
        def persistent_id(self, obj: Any) -> None:
            if isinstance(obj, Future):
                raise _FutureFound
            return None

    try:
        Watch(_Nowhere(), protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except _FutureFound:
        return True
    return False


class _FutureFound(Exception):
    """`_holds_future` met one: its pickling stops there."""


class _Nowhere:
    """A file that keeps nothing written to it."""

    def write(self, data: Any) -> int:
        return len(data)
