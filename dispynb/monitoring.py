"""A live, thread-safe view of a `JobCluster` for monitors.

The web monitor (`dispynb.httpd`) and the JupyterLab panel show the same things:
a cluster's nodes, its jobs and how many ended how. `ClusterMonitor` follows a
cluster through `JobCluster.add_listener` and turns it into JSON-ready snapshots
that any thread may take; it never slows the cluster down when nobody looks
(a listener call is a few attribute reads and a counter bump).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dispynb.cluster import live_clusters
from dispynb.job import DispyJob, JobStatus
from dispynb.node import DispyNode
from dispynb.transport.addressing import format_address

if TYPE_CHECKING:
    from dispynb.cluster import JobCluster

__all__ = ["ClusterMonitor", "live_clusters"]

#: Longest text shown for a job's id or arguments.
SHORT = 80

_RUNNING = (JobStatus.Running, JobStatus.ProvisionalResult)


class ClusterMonitor:
    """Follow ``cluster`` and give snapshots of it to monitors.

    Parameters
    ----------
    cluster:
        The cluster to watch (a `JobCluster` or `SharedJobCluster`).
    history:
        How many finished jobs to remember for display (counts cover all jobs).
    ended:
        Jobs of the cluster that ended before the monitor was made, each with
        the node it ran on (``HOST:PORT`` or None): a notebook's run, shown once
        it finished (`dispynb.Run.ended_jobs`; the cluster no longer holds them).
        They are listed as the finished ones.

    Examples
    --------
    >>> monitor = ClusterMonitor(cluster)  # doctest: +SKIP
    >>> monitor.snapshot()["counts"]  # doctest: +SKIP
    {'pending': 0, 'running': 2, 'finished': 8, ...}
    """

    def __init__(
        self,
        cluster: JobCluster,
        history: int = 1000,
        ended: Iterable[tuple[DispyJob, str | None]] = (),
    ) -> None:
        self.cluster = cluster
        self._changed = threading.Condition()
        self._version = 0
        self._live: dict[int, DispyJob] = {}
        # Keys of the live jobs running: the counts of a snapshot without looking at
        # every job (the lab panel's, 4 a second, with 200,000 jobs queued).
        self._running: set[int] = set()
        self._where: dict[int, str] = {}  # job key -> node id, while it runs
        # Finished jobs as shown, with a weak reference for their arguments (holding
        # the jobs would keep their results alive).
        self._finished: deque[tuple[dict[str, Any], weakref.ref[DispyJob]]] = deque(
            maxlen=history
        )
        #: Jobs it saw end Terminated by a cancel asked for while they ran (Cancel
        #: in the lab panel or the web monitor, ``job.cancel()``): what the user
        #: cancelled, not what failed (dispy's status for both is Terminated).
        self.stopped = 0
        self._cancel_asked = getattr(cluster, "_cancel_requested", None)
        # The events heard while the jobs submitted before are copied, applied after
        # them: another thread may be submitting (a cell's loop while the panel or
        # the web monitor attaches), and a job its event put first would precede
        # the older jobs queued, which `_shown_live` relies on being in submit order.
        self._attaching = threading.Lock()
        self._held: list[tuple[int, DispyNode | None, DispyJob | None]] | None = []
        cluster.add_listener(self._on_event)
        with self._attaching:
            # Copied under the listener so none is missed, in submit (key) order.
            for key, job in list(cluster._jobs.items()):
                if not job.done():
                    self._live.setdefault(key, job)
                    if job.status in _RUNNING:
                        self._running.add(key)
            held, self._held = self._held, None
            # Those whose end is among the events held are recorded by it.
            heard = {job._key for _, _, job in held if job is not None}
            for job, where in ended:
                if job.status.is_final and job._key not in heard:
                    record = {**self._record(job, False), "node": where}
                    self._finished.append((record, weakref.ref(job)))
            for event in held:
                self._apply(*event)

    @property
    def version(self) -> int:
        """A number that changes whenever the cluster does."""
        return self._version

    def wait_change(self, version: int, timeout: float) -> int:
        """Block until the version is not ``version`` (or ``timeout``); return it."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version, timeout)
            return self._version

    def close(self) -> None:
        """Stop following the cluster and wake any `wait_change`."""
        self.cluster.remove_listener(self._on_event)
        self._bump()

    # -- events (on the cluster's threads) --------------------------------------------

    def _on_event(
        self, status: int, node: DispyNode | None, job: DispyJob | None
    ) -> None:
        if self._held is not None:  # still attaching (rare): only then a lock
            with self._attaching:
                if self._held is not None:
                    self._held.append((status, node, job))
                    return
        self._apply(status, node, job)
        self._bump()

    def _apply(self, status: int, node: DispyNode | None, job: DispyJob | None) -> None:
        """Follow a job's event (by its status now: a later event may be heard
        first, from another thread). Its end is recorded at its own final event,
        heard once: an earlier event heard after the end only drops it from the
        live jobs (it was recorded twice, and counted twice as stopped)."""
        key = job._key if job is not None else None
        if job is not None and key is not None:
            if node is not None:
                self._where[key] = format_address(node.ip_addr, node.port)
            if job.status.is_final:
                self._live.pop(key, None)
                self._running.discard(key)
                if JobStatus(status).is_final:
                    # Told before the cluster forgets the cancel (`_forget_cancel`).
                    asked = self._cancel_asked
                    if job.status is JobStatus.Terminated and asked and asked(job):
                        self.stopped += 1
                    record = self._record(job, show_args=False)
                    self._finished.append((record, weakref.ref(job)))
                self._where.pop(key, None)
            else:
                self._live[key] = job
                if job.status in _RUNNING:
                    self._running.add(key)
                else:
                    self._running.discard(key)
                    self._where.pop(key, None)  # requeued

    def _bump(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    # -- snapshots -----------------------------------------------------------------

    def snapshot(
        self, *, show_args: bool = False, max_jobs: int = 500
    ) -> dict[str, Any]:
        """The cluster now, as plain JSON-ready data.

        ``jobs`` lists the unfinished jobs (running first) and then the most
        recently finished, ``max_jobs`` at most; ``args`` is a short text of each
        job's arguments only with ``show_args`` (they may be private data).
        """
        cluster = self.cluster
        version = self._version
        # Counted as the cluster counts the ended (job_counts): a job leaves the
        # live ones as its end is counted, in the same event.
        running = len(self._running)
        pending = max(0, len(self._live) - running)
        jobs = [self._record(job, show_args) for job in self._shown_live(max_jobs)]
        for record, ref in reversed(list(self._finished)):
            if len(jobs) >= max_jobs:
                break
            finished = ref() if show_args else None
            jobs.append(
                {**record, "args": _args_text(finished)} if finished else record
            )
        counts = cluster.job_counts
        return {
            "id": cluster.uid,
            "name": cluster.name,
            "closed": cluster._closed,
            "start_time": cluster._start_time,
            "now": time.time(),
            "version": version,
            "counts": {
                "pending": pending,
                "running": running,
                "finished": counts["Finished"],
                "terminated": counts["Terminated"],
                "cancelled": counts["Cancelled"],
                "abandoned": counts["Abandoned"],
                "total": counts["submitted"],
            },
            "nodes": self.nodes(),
            "jobs": jobs,
        }

    def _shown_live(self, max_jobs: int) -> list[DispyJob]:
        """The first ``max_jobs`` unfinished jobs, running first, each group in
        submit order, looking only at the running ones and the first queued: the
        web monitor asks for them at each poll, with 200,000 jobs queued."""
        if not max_jobs:
            return []
        live = self._live
        shown: dict[int, DispyJob] = {}
        for key in list(self._running):
            job = live.get(key)
            if job is not None:
                shown[key] = job
        # The live jobs are in submit order (a job is added at its Created event,
        # on the submitting thread, and stays in place when it starts or is
        # requeued): the first queued are at the front, after the running ones.
        for _ in range(3):
            scanned: dict[int, DispyJob] = {}
            queued = 0
            try:
                for key, job in live.items():
                    if queued >= max_jobs:
                        break
                    if not job.done():
                        scanned[key] = job
                        queued += job.status not in _RUNNING
            except RuntimeError:  # changed by an event meanwhile: look again
                continue
            break
        else:  # events without a pause: copy them (the cost grows with the jobs)
            scanned = dict(list(live.items()))
        shown.update(scanned)
        ordered = [job for job in shown.values() if not job.done()]
        ordered.sort(key=lambda job: (job.status not in _RUNNING, job._seq))
        return ordered[:max_jobs]

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes now, as in `snapshot` (cheap: no job is looked at)."""
        return [
            _node_record(node_id, node)
            for node_id, node in sorted(list(self.cluster._nodes.items()))
        ]

    # -- actions -------------------------------------------------------------------

    def cancel(self, key: int) -> bool:
        """Cancel the job with this key; False if there is none or it is done."""
        job = self._live.get(key) or self.cluster._jobs.get(key)
        return job is not None and self.cluster.cancel(job) == 0

    def cancel_all(self) -> int:
        """Cancel every unfinished job of the cluster in one request (none starts
        on a worker freed by another's cancel); return how many."""
        jobs = [job for job in list(self.cluster._jobs.values()) if not job.done()]
        return len(self.cluster._cancel_all(jobs))

    def set_node_cpus(self, node_id: str, cpus: int) -> int:
        """Use ``cpus`` CPUs of the node ``"ip:port"``; the CPUs now used, or -1
        for a node not of the cluster. Raises `ClusterError` saying why when
        the cluster cannot (`NotSupportedError` when its engine never can)."""
        if node_id not in self.cluster._nodes:
            return -1
        return self.cluster._resize_node(node_id, cpus)

    def _record(self, job: DispyJob, show_args: bool) -> dict[str, Any]:
        return {
            "key": job._key,
            "id": _short(_safe_repr(job.id)),
            "status": JobStatus(job.status).name,
            "node": self._where.get(job._key) if job._key is not None else None,
            "submit_time": job.submit_time,
            "start_time": job.start_time,
            "end_time": job.end_time,
            "args": _args_text(job) if show_args else None,
        }


def _args_text(job: DispyJob) -> str:
    parts = [_safe_repr(arg) for arg in job._args]
    parts += [f"{key}={_safe_repr(value)}" for key, value in job._kwargs.items()]
    return _short(", ".join(parts))


def _safe_repr(value: Any) -> str:
    """repr() of user objects, which may raise or be huge."""
    try:
        return repr(value)[: SHORT * 2]
    except Exception as exc:
        return f"<{type(value).__name__}: repr failed: {exc!r}>"


def _short(text: str) -> str:
    return text if len(text) <= SHORT else text[: SHORT - 1] + "…"


def _node_record(node_id: str, node: DispyNode) -> dict[str, Any]:
    avail = node.avail_info
    return {
        "id": node_id,
        "name": node.name,
        "ip_addr": node.ip_addr,
        "port": node.port,
        "cpus": node.cpus,
        "avail_cpus": node.avail_cpus,
        "busy": node.busy,
        "jobs_done": node.jobs_done,
        "cpu_time": node.cpu_time,
        "tx": node.tx,
        "rx": node.rx,
        "update_time": node.update_time,
        "platform": node.platform,
        "avail": None
        if avail is None
        else {
            "cpu": avail.cpu,
            "memory": avail.memory,
            "disk": avail.disk,
            "swap": avail.swap,
        },
    }
