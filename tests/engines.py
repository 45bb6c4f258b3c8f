"""`ThreadEngine`: an engine that runs jobs on threads of this process.

A small but complete engine written only against `dispynb.backends.base` (as the
Dask and Ray engines are), for tests of what sits above the seam (the façade,
`Run.map`, the magics, `Executor`) without node servers. It declares one feature
(``submit_node``): every other one must be refused by the façade.
"""

from __future__ import annotations

import concurrent.futures
import time
import traceback
from typing import Any

import cloudpickle

from dispynb.backends import base
from dispynb.backends.base import ClusterConfig, JobEvents, JobRequest, NodeInfo
from dispynb.depends import FileRef
from dispynb.errors import NotSupportedError, SerializationError
from dispynb.job import JobStatus
from dispynb.node import NodeAllocate


class ThreadBackend:
    """Jobs on a thread pool; every event handed to the façade's loop thread."""

    def __init__(self, events: JobEvents, config: ClusterConfig) -> None:
        self._events = events
        self._runner = config.runner
        self._func = config.options.computation
        assert callable(self._func)
        self.node = NodeInfo("threads:0", "127.0.0.1", 0, "threads", 2, "python")
        self._pool = concurrent.futures.ThreadPoolExecutor(2, "test-engine")
        self._futures: dict[int, concurrent.futures.Future[None]] = {}
        self._closed = False
        self._report(events.node_ready, self.node)
        self._flush()  # the façade knows the node when open returns

    def _flush(self) -> None:
        """Deliver every event handed over so far."""

        async def nothing() -> None:
            pass

        self._runner.run_sync(nothing)

    def _report(self, event: Any, *args: Any) -> None:
        if not self._closed:
            self._runner.call_soon(event, *args)

    def _run(self, job: JobRequest) -> None:
        self._report(self._events.job_running, job.key, self.node, time.time())
        start = time.time()
        try:
            result = self._func(*job.args, **job.kwargs)
        except Exception:
            outcome = base.Outcome(
                JobStatus.Terminated,
                exception=traceback.format_exc(),
                start_time=start,
                end_time=time.time(),
            )
        else:
            outcome = base.Outcome(
                JobStatus.Finished, result, start_time=start, end_time=time.time()
            )
        self._futures.pop(job.key, None)
        self._report(self._events.job_done, job.key, self.node, outcome)

    def prepare(self, job: JobRequest) -> None:
        try:
            job.payload = cloudpickle.dumps((job.args, job.kwargs))
        except Exception as exc:
            raise SerializationError(f"job arguments cannot be sent: {exc}") from exc

    def submit(self, job: JobRequest) -> None:
        self._futures[job.key] = self._pool.submit(self._run, job)

    def cancel(
        self, keys: list[int], unstarted: bool = False, held: bool = False
    ) -> None:
        for key in keys:  # a job on a thread runs to its end
            future = self._futures.pop(key, None)
            if future is not None and future.cancel():
                self._report(self._events.job_cancelled, key)

    def node_load(self) -> dict[str, tuple[int, int]]:
        return {self.node.node_id: (2, len(self._futures))}

    def add_nodes(self, specs: list[NodeAllocate]) -> None:
        raise NotSupportedError("not here")

    def set_cpus(self, node_id: str, cpus: int) -> int:
        raise NotSupportedError("not here")

    def close_node(self, node_id: str, terminate: bool) -> bool:
        raise NotSupportedError("not here")

    def resetup_node(self, node_id: str, terminate: bool) -> bool:
        raise NotSupportedError("not here")

    def send_file(self, node_id: str, ref: FileRef) -> str:
        raise NotSupportedError("not here")

    def running_jobs(self, node_id: str) -> list[int]:
        raise NotSupportedError("not here")

    def traffic(self, node_id: str) -> tuple[int, int]:
        return (0, 0)

    def close(self, terminate: bool) -> None:
        self._pool.shutdown(wait=not terminate, cancel_futures=terminate)
        self._closed = True
        self._flush()


class ThreadEngine:
    """Jobs on 2 threads of this process, as one node named ``threads``."""

    name = "threads"
    features = frozenset({base.SUBMIT_NODE})

    def __init__(self) -> None:
        self.opened: list[ThreadBackend] = []
        self.closed = False

    def close(self) -> None:
        """What a session calls when it lets the engine go."""
        self.closed = True

    def open(self, events: JobEvents, config: ClusterConfig) -> ThreadBackend:
        backend = ThreadBackend(events, config)
        self.opened.append(backend)
        return backend
