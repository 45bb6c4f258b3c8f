"""A `JobCluster`'s jobs: submitted (with their limits, per-job depends and object
handles), put objects, and cancels."""

from __future__ import annotations

import copy
import logging
from typing import Any

from dispynb import objects
from dispynb._clusterevents import forwards_events
from dispynb._clusterstate import _ClusterState
from dispynb._inplace import IN_PLACE_WAIT, wait_in_place
from dispynb._interruptible import HeldInterrupts
from dispynb.backends import base
from dispynb.backends.base import JobRequest
from dispynb.depends import Dependencies, collect
from dispynb.errors import ClusterError, NotSupportedError, SerializationError
from dispynb.job import DispyJob, JobStatus
from dispynb.options import check_job_timeout, check_mem_limit

logger = logging.getLogger("dispynb.cluster")

#: What `submit` and its kin raise once the cluster is closed.
_CLOSED = "this cluster is closed: create a new JobCluster"


class _Jobs(_ClusterState):
    """Submitting and cancelling jobs, and objects put for them."""

    def submit(self, *args: Any, **kwargs: Any) -> DispyJob:
        """Run the computation with these arguments on some node; return its job.

        Raises `SerializationError` (naming the type) if the arguments cannot be
        pickled, and `ClusterError` if the cluster is closed. If a Ctrl-C (or
        another signal whose handler raises) interrupts it, the job is cancelled:
        it ends ``Cancelled`` (``Terminated`` if a node had started it), so that
        nothing runs or waits for a job the caller never got.
        """
        return self._submit(None, None, args, kwargs)

    def _wait_in_place(self, job: DispyJob, budget: float | None) -> None:
        """Called by ``job.wait()`` before it sleeps: if the loop is idle, read what
        arrives for it on this thread for a few milliseconds (`dispynb._inplace`),
        so that a quick job's result wakes no other thread."""
        backend = self._backend
        if backend is not None and getattr(backend, "reads_in_place", False):
            if budget is None:
                wait_in_place(self._runner, job.done)
            else:
                wait_in_place(self._runner, job.done, min(budget, IN_PLACE_WAIT))

    def put(self, obj: Any) -> objects.ObjectRef:
        """Send ``obj`` to the nodes once for many jobs; return a handle to pass to
        jobs instead of it.

        A job that receives the handle (as an argument, at any depth) sees ``obj``
        itself. Each node receives it once, with the first job that needs it, and
        each worker process loads it once and keeps it for the computation's later
        jobs (so jobs should not modify it). Nodes and client drop it when the
        cluster closes. Raises `SerializationError` if ``obj`` cannot be pickled,
        `ClusterError` if its file cannot be written (a full disk).
        """
        if self._closed:
            raise ClusterError(_CLOSED)
        self._require(base.JOB_DEPENDS, "put")
        if self._objects_dir is None:
            self._objects_dir = objects.make_directory()
        ref = objects.write(obj, self._objects_dir)
        self._objects[ref.digest] = ref
        return ref

    def _add_object_files(
        self, request: JobRequest, refs: list[objects.ObjectRef]
    ) -> None:
        """A job's arguments hold object handles: their files go with it."""
        for ref in refs:
            if self._objects.get(ref.digest) is not ref:
                raise ClusterError(
                    f"{ref!r} was put in another cluster: put it in this one"
                )
        deps = request.depends or Dependencies()
        known = {f.digest for f in deps.files}
        for ref in refs:
            if ref.digest not in known:
                deps.files.append(ref.file)
                known.add(ref.digest)
        request.depends = deps

    def submit_job_id(self, job_id: Any, *args: Any, **kwargs: Any) -> DispyJob:
        """Like `submit`, with ``job.id`` set to ``job_id``."""
        return self._submit(job_id, None, args, kwargs)

    def submit_node(self, node: Any, *args: Any, **kwargs: Any) -> DispyJob | None:
        """Like `submit`, but run on ``node`` (a `DispyNode`, address or name) only.

        Returns None (and logs why) if ``node`` is not a node of this cluster, or
        was taken out with `deallocate_node`, as dispy does.
        """
        self._require(base.SUBMIT_NODE, "submit_node")
        node_id = self._pinned_node(node)
        if node_id is None:
            return None
        return self._submit(None, node_id, args, kwargs)

    def submit_job_id_node(
        self, job_id: Any, node: Any, *args: Any, **kwargs: Any
    ) -> DispyJob | None:
        """`submit_node` with ``job.id`` set to ``job_id``."""
        self._require(base.SUBMIT_NODE, "submit_job_id_node")
        node_id = self._pinned_node(node)
        if node_id is None:
            return None
        return self._submit(job_id, node_id, args, kwargs)

    def _pinned_node(self, node: Any) -> str | None:
        """The id of ``node`` for `submit_node`, or None (logged) if it cannot
        take jobs of this cluster. A node being set up again (`resetup_node`, or
        `allocate_node` as its `close_node` went on) takes them once set up."""
        if self._closed:  # (its nodes are closed too: as `submit`)
            raise ClusterError(_CLOSED)
        node_id = self._node_id(node) or self._returning(node)
        if node_id is None:
            logger.warning("submit_node: %r is not a node of this cluster", node)
        elif node_id in self._deallocated:
            logger.warning(
                "submit_node: %r was deallocated (deallocate_node): give it back "
                "with allocate_node first",
                node,
            )
            return None
        return node_id

    def _submit(
        self,
        job_id: Any,
        node_id: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> DispyJob:
        backend = self._backend
        if self._closed or backend is None:
            raise ClusterError(_CLOSED)
        if (rebound := self._globals.changed()) is not None:
            logger.warning("%s", rebound)
        job_deps = None
        depends = kwargs.pop("dispy_job_depends", None)
        if depends:
            self._require(base.JOB_DEPENDS, "dispy_job_depends")
            job_deps = collect(depends, "dispy_job_depends")
        timeout, mem_limit = self._job_limits(kwargs)
        request = JobRequest(0, args, kwargs, node_id, job_deps, timeout, mem_limit)
        with objects.collecting() as refs:
            try:
                backend.prepare(request)  # nothing registered yet
            except SerializationError as exc:  # its message says all: not where
                raise exc.with_traceback(None) from exc.__cause__
        if refs:
            self._add_object_files(request, refs)
        if not self._repeats.hinted:  # before the job exists: a Ctrl-C here leaves none
            self._hint_put(args, kwargs)
        job = DispyJob(job_id, args, kwargs)
        # A Ctrl-C (or another signal whose handler raises) in the middle would leave
        # the job half registered, or sent with no DispyJob for the user: held until
        # the job is queued, then raised with the job cancelled (below). A signal
        # pending is raised here, with nothing registered.
        held = HeldInterrupts().__enter__()
        try:
            self._register(job, request, backend)
        except BaseException:
            held.__exit__(None, None, None)
            raise
        try:
            held.__exit__(None, None, None)
        except BaseException:
            # The user gets no handle of the job: it must not run, nor be waited for
            # (cluster.wait, close). It ends Cancelled (Terminated if started).
            backend.cancel([request.key])
            raise
        return job

    def _hint_put(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Say once to `put` a large argument sent with job after job (if the
        engine has `put`)."""
        hint = self._repeats.note(args, kwargs)
        if hint is None:
            return
        try:
            self._require(base.JOB_DEPENDS, "put")
        except NotSupportedError:
            return
        logger.warning("%s", hint)

    def _register(
        self, job: DispyJob, request: JobRequest, backend: base.Backend
    ) -> None:
        """Count ``job`` as submitted, report it `Created` and hand it over."""
        key = request.key = next(self._keys)
        job._key = key
        job._cluster = self  # for job.cancel() / job.future.cancel()
        self._jobs[key] = job
        if self._journal.jobs:
            self._journal.submitted(key, job)
        with self._outstanding_lock:
            self._outstanding += 1
            self._submitted += 1
            self.end_time = None
        status = self._options.cluster_status
        # Not for a notebook run's that ignores it: ~5 us a job.
        if status is not None and forwards_events(status):
            self._notify_cluster(JobStatus.Created, None, copy.copy(job))
        self.job_counts["submitted"] += 1
        if self._listeners:  # tested here: no call per job without monitors
            self._emit(JobStatus.Created, None, job)
        backend.submit(request)

    def _job_renamed(self, job: DispyJob) -> None:
        """The user gave ``job`` another id (`DispyJob.id`): journal it."""
        if self._journal.jobs and job._key is not None:
            self._journal.renamed(job._key, job)

    def _job_limits(self, kwargs: dict[str, Any]) -> tuple[float | None, int | None]:
        """Pop ``dispy_job_timeout``/``dispy_job_mem_limit``: the job's limits.

        Each falls back to the cluster's ``job_timeout``/``mem_limit``; an explicit
        None lifts the cluster's limit for this job.
        """
        opts = self._options
        timeout, mem = opts.job_timeout, opts.mem_limit
        if "dispy_job_timeout" in kwargs:
            self._require(base.JOB_LIMITS, "dispy_job_timeout")
            timeout = check_job_timeout(
                kwargs.pop("dispy_job_timeout"), "dispy_job_timeout"
            )
        if "dispy_job_mem_limit" in kwargs:
            self._require(base.JOB_LIMITS, "dispy_job_mem_limit")
            mem = check_mem_limit(
                kwargs.pop("dispy_job_mem_limit"), "dispy_job_mem_limit"
            )
        assert not isinstance(mem, str)  # ClusterOptions normalised it to bytes
        return timeout, mem

    def cancel(self, job: DispyJob) -> int:
        """Cancel a job: queued jobs end `Cancelled`, running ones `Terminated`
        (``Finished`` if the computation catches the KeyboardInterrupt and returns).

        As in dispy, ``job.status`` is ``Cancelled`` as soon as this returns, until
        the job's end is reported; no callback reports the cancel itself. Returns 0,
        or -1 if the job had already finished or was cancelled already.
        """
        # The cluster's own job: a callback may cancel with the copy it was given.
        job = self._jobs.get(job._key, job) if job._key is not None else job
        if job.done() or job._key not in self._jobs or not job._mark_cancelled():
            return -1
        return 0 if self._cancel_all([job]) else -1

    def _cancel_all(self, jobs: list[DispyJob]) -> list[DispyJob]:
        """Cancel ``jobs`` in one request to the engine, not one by one: a node then
        drops the queued ones in the same step as it stops the running ones, so no
        queued job starts on a worker freed in between (a notebook's Stop used to
        terminate such a job as if it had been running). Returns the jobs that were
        not done."""
        live = [
            job
            for job in jobs
            if not job.done() and job._key is not None and job._key in self._jobs
        ]
        if live and self._backend is not None:
            keys = [job._key for job in live if job._key is not None]
            self._cancel_asked.update(keys)
            self._backend.cancel(keys)
        return live

    def _cancel_requested(self, job: DispyJob) -> bool:
        """Whether ``job``, not yet announced ended, ends because a cancel was asked
        for it (`cancel`, `_cancel_all`): ``Terminated`` then is no failure. For
        the cluster's listeners and callbacks, which hear of its end before the
        cluster forgets it (`_forget_cancel`)."""
        return job._key in self._cancel_asked

    def _cancel_unstarted(self, jobs: list[DispyJob]) -> bool:
        """Cancel ``jobs`` unless they have started (`dispynb.futures.JobFuture`).

        Returns True if the cancels went to the engine: each job then ends
        ``Cancelled`` or is reported started (or done). On the I/O thread itself,
        which cannot wait for nodes, only the jobs no node has yet are cancelled
        (at once) and False is returned.
        """
        keys = [
            job._key
            for job in jobs
            if job._key is not None and not job.done() and job._key in self._jobs
        ]
        backend = self._backend
        if backend is None:
            return False
        if self._runner.in_loop_thread():
            backend.cancel(keys, unstarted=True, held=True)
            return False
        if keys:
            backend.cancel(keys, unstarted=True)
        return True
