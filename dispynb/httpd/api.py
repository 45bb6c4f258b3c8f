"""The monitor's JSON API: one snapshot route (long-poll) and three actions.

===========================  ==============================================
``GET  /api/cluster``        `ClusterMonitor.snapshot`; ``?since=<version>``
                             waits (up to ``poll_sec``) for a newer one
``POST /api/jobs/<key>/cancel``  cancel one job
``POST /api/cancel-all``     cancel every job not done
``POST /api/nodes/<id>/cpus``    body ``{"cpus": n}``: `JobCluster.set_node_cpus`
===========================  ==============================================

Actions run on a small thread pool: they call the cluster's synchronous API, which
waits for the cluster's own I/O thread, and the monitor's loop must keep answering.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
class ApiContext:
    """What the API handlers share: the monitor, its change feed and options."""

    monitor: ClusterMonitor
    feed: ChangeFeed
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
        context.active += 1

    def on_finish(self) -> None:
        """Count the request as answered."""
        self.context.active -= 1

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
        context = self.context
        if since >= 0:
            await context.feed.wait(since, context.poll_sec)
        snapshot = context.monitor.snapshot(
            show_args=context.show_job_args, max_jobs=max_jobs
        )
        self.set_header(CSRF_HEADER, self.guard.csrf_token)
        self.write_json(snapshot)


class CancelJobHandler(ApiHandler):
    """``POST /api/jobs/<key>/cancel``."""

    async def post(self, key: str) -> None:
        """Cancel one job; 404 when no such job is pending or running."""
        if not key.isdigit() or len(key) > 18:
            self.refuse(400, f"job key must be a non-negative integer, not {key!r}")
            return
        if not await self.run_blocking(self.context.monitor.cancel, int(key)):
            self.refuse(
                404, f"no job with key {key} to cancel (unknown or already done)"
            )
            return
        self.write_json({"cancelled": True, "key": int(key)})


class CancelAllHandler(ApiHandler):
    """``POST /api/cancel-all``."""

    async def post(self) -> None:
        """Cancel every job not done; answers how many."""
        count = await self.run_blocking(self.context.monitor.cancel_all)
        self.write_json({"cancelled": count})


class NodeCpusHandler(ApiHandler):
    """``POST /api/nodes/<id>/cpus`` with body ``{"cpus": n}``."""

    async def post(self, node_id: str) -> None:
        """Set the CPUs the cluster uses on one node; answers the CPUs now used."""
        cpus = self._cpus_from_body()
        if cpus is None:
            return
        used = await self.run_blocking(
            self.context.monitor.set_node_cpus, node_id, cpus
        )
        if used < 0:
            self.refuse(404, f"no node {node_id!r} in this cluster (ids are 'ip:port')")
            return
        self.write_json({"node": node_id, "cpus": used})

    def _cpus_from_body(self) -> int | None:
        try:
            body = json.loads(self.request.body or b"null")
        except (ValueError, UnicodeDecodeError):
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
