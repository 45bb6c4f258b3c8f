"""The monitor's JSON API: one snapshot route (long-poll) and three actions.

===========================  ==============================================
``GET  /api/cluster``        `ClusterMonitor.snapshot`; ``?since=<version>``
                             waits (up to ``poll_sec``) for a newer one
``POST /api/jobs/<key>/cancel``  cancel one job
``POST /api/cancel-all``     cancel every job not done
``POST /api/nodes/<id>/cpus``    body ``{"cpus": n}``: `JobCluster.set_node_cpus`
===========================  ==============================================

Every route takes ``?cluster=<key>`` to pick one of the clusters shown
(`DispyHTTPServer.add_cluster`); without it, the first one. A snapshot lists every
cluster shown (``clusters``: key and name) so that the page can offer a choice.

Actions run on a small thread pool: they call the cluster's synchronous API, which
waits for the cluster's own I/O thread, and the monitor's loop must keep answering.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tornado.escape
import tornado.iostream

from dispynb.errors import ClusterError, NotSupportedError
from dispynb.httpd.feed import ChangeFeed
from dispynb.httpd.security import CSRF_HEADER, SecureHandler

if TYPE_CHECKING:
    from dispynb.monitoring import ClusterMonitor

#: Bounds of ``?max_jobs=`` (jobs listed in a snapshot).
DEFAULT_MAX_JOBS = 500
MAX_JOBS_LIMIT = 5000

#: Bound of ``{"cpus": n}``; negative means "all but n" as in dispy.
MAX_CPUS = 4096


@dataclass
class ClusterView:
    """One cluster shown by the monitor: its `ClusterMonitor` and change feed."""

    key: str
    monitor: ClusterMonitor
    feed: ChangeFeed


@dataclass
class ApiContext:
    """What the API handlers share: the clusters shown, by key, and options."""

    views: dict[str, ClusterView]
    executor: ThreadPoolExecutor
    show_job_args: bool
    poll_sec: float
    #: API requests being answered (shutdown waits for them)
    active: int = 0


class ApiHandler(SecureHandler):
    """Base of the API handlers."""

    def initialize(self, context: ApiContext) -> None:
        """Take the shared context (given in the route table)."""
        self.context = context
        self._counted_at_flush = False
        context.active += 1

    def on_finish(self) -> None:
        """Count the request as answered (see `finish_flushed`)."""
        if not self._counted_at_flush:
            self.context.active -= 1

    async def finish_flushed(self, data: Any) -> None:
        """Answer ``data`` as JSON; the request counts as answered only once the
        answer left, so that a shutdown does not cut it off."""
        self._counted_at_flush = True
        self.set_header("Content-Type", "application/json; charset=utf-8")
        try:
            await self.finish(tornado.escape.json_encode(data))
        except tornado.iostream.StreamClosedError:
            pass  # the browser left
        finally:
            self.context.active -= 1

    def view(self) -> ClusterView | None:
        """The cluster named by ``?cluster=`` (default: the first); refuses if none."""
        views = self.context.views
        key = self.get_query_argument("cluster", None)
        if key is None:
            view = next(iter(views.values()), None)
            if view is None:
                self.refuse(404, "the monitor shows no cluster now (add_cluster)")
            return view
        view = views.get(key)
        if view is None:
            self.refuse(
                404,
                f"no cluster {key[:80]!r} in this monitor; it shows: "
                + (", ".join(views) or "none"),
            )
        return view

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the API's thread pool."""
        return await asyncio.get_running_loop().run_in_executor(
            self.context.executor, fn, *args
        )

    def int_argument(
        self, name: str, default: int | None, low: int, high: int
    ) -> int | None:
        """Query argument ``name`` as an int in [low, high]; refuses it if bad."""
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            self.refuse(
                400, f"?{name}= must be an integer from {low} to {high}, not {raw!r}"
            )
            return None
        return value


class ClusterHandler(ApiHandler):
    """``GET /api/cluster[?since=<version>][&max_jobs=<n>]``."""

    async def get(self) -> None:
        """The snapshot, after waiting for a version other than ``since`` if given."""
        since = self.int_argument("since", -1, -1, 2**62)
        max_jobs = self.int_argument("max_jobs", DEFAULT_MAX_JOBS, 1, MAX_JOBS_LIMIT)
        if since is None or max_jobs is None:
            return
        view = self.view()
        if view is None:
            return
        context = self.context
        if since >= 0:
            await view.feed.wait(since, context.poll_sec)
        snapshot = view.monitor.snapshot(
            show_args=context.show_job_args, max_jobs=max_jobs
        )
        snapshot["key"] = view.key
        snapshot["clusters"] = [
            {"key": key, "name": other.monitor.cluster.name}
            for key, other in list(context.views.items())
        ]
        self.set_header(CSRF_HEADER, self.guard.csrf_token)
        await self.finish_flushed(snapshot)


class CancelJobHandler(ApiHandler):
    """``POST /api/jobs/<key>/cancel``."""

    async def post(self, key: str) -> None:
        """Cancel one job; 404 when no such job is pending or running."""
        if not key.isdigit() or len(key) > 18:
            self.refuse(400, f"job key must be a non-negative integer, not {key!r}")
            return
        view = self.view()
        if view is None:
            return
        if not await self.run_blocking(view.monitor.cancel, int(key)):
            self.refuse(
                404, f"no job with key {key} to cancel (unknown or already done)"
            )
            return
        self.write_json({"cancelled": True, "key": int(key)})


class CancelAllHandler(ApiHandler):
    """``POST /api/cancel-all``."""

    async def post(self) -> None:
        """Cancel every job not done; answers how many."""
        view = self.view()
        if view is None:
            return
        count = await self.run_blocking(view.monitor.cancel_all)
        self.write_json({"cancelled": count})


class NodeCpusHandler(ApiHandler):
    """``POST /api/nodes/<id>/cpus`` with body ``{"cpus": n}``."""

    async def post(self, node_id: str) -> None:
        """Set the CPUs the cluster uses on one node; answers the CPUs now used."""
        cpus = self._cpus_from_body()
        if cpus is None:
            return
        view = self.view()
        if view is None:
            return
        try:
            used = await self.run_blocking(view.monitor.set_node_cpus, node_id, cpus)
        except NotSupportedError as exc:  # e.g. an older shared scheduler
            self.refuse(400, str(exc))
            return
        except ClusterError as exc:  # e.g. the node left the shared scheduler
            self.refuse(409, f"node {node_id!r}: {exc}")
            return
        if used < 0:
            self.refuse(404, f"no node {node_id!r} in this cluster (ids are 'ip:port')")
            return
        self.write_json({"node": node_id, "cpus": used})

    def _cpus_from_body(self) -> int | None:
        try:
            body = json.loads(self.request.body or b"null")
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            self.refuse(400, 'the body must be JSON like {"cpus": 2}')
            return None
        cpus = body.get("cpus") if isinstance(body, dict) else None
        if type(cpus) is not int or not -MAX_CPUS <= cpus <= MAX_CPUS:
            self.refuse(
                400,
                f'"cpus" must be an integer from -{MAX_CPUS} to {MAX_CPUS} '
                "(negative: all but that many), as in "
                '{"cpus": 2}',
            )
            return None
        return cpus
