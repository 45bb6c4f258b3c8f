"""A launcher's number of nodes: `scale` to a count, `adapt` to the jobs, and the
steps `dispynb.deploy.adaptive` takes (launch, drain, stop drained nodes, count the
launches that failed)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from dispynb.deploy.adaptive import Adaptive, AdaptOptions, NodeView
from dispynb.deploy.launcherstate import Handle, Launched, LaunchError, _LauncherState
from dispynb.errors import ConfigurationError

if TYPE_CHECKING:
    from dispynb.deploy.adaptive import ScalableCluster
    from dispynb.status import Workload

logger = logging.getLogger("dispynb.deploy.base")


class _Scaling(_LauncherState[Handle]):
    """Scaling and adapting a launcher's nodes."""

    def scale(self, count: int) -> None:
        """Run ``count`` nodes: launch more, or drain and stop some (those still
        starting first, then the least busy: their running jobs finish first).

        Stops `adapt`. Launches before returning; drained nodes stop once their
        jobs are done (in the background).
        """
        if self._closed:
            raise LaunchError("this launcher is closed")
        if count < 0:
            raise ConfigurationError(f"scale needs a count >= 0, not {count}")
        if self._adaptive is not None:
            self._adaptive.stop()
        with self._scaling:
            with self._changed:
                active = len(self._active())
            if count > active:
                self._scale_up(count - active, f"scale({count})")
            elif count == 0:
                self._drain([x.name for x in self._active()], "scale(0)")
            elif count < active:
                # A fixed target: adapt's choice of nodes to drain, once, now.
                Adaptive(self, AdaptOptions(minimum=count, maximum=count)).step()
        self._ensure_drainer()

    def adapt(
        self,
        minimum: int = 0,
        maximum: int | None = None,
        *,
        idle_timeout: float = 60.0,
        interval: float = 1.0,
        cooldown: float = 10.0,
        cpus_per_node: int | None = None,
    ) -> Adaptive:
        """Grow and shrink the nodes with the jobs of the subscribed clusters.

        Every ``interval`` s: while jobs wait, launch nodes for them (CPUs per node:
        ``cpus_per_node``, else what the nodes registered with), up to ``maximum``
        (default `default_count`); drain and stop nodes idle for ``idle_timeout`` s,
        down to ``minimum``, not within ``cooldown`` s of the last change. A drained
        node gets no new jobs and stops once its running jobs are done. Calling
        ``adapt`` again changes the bounds; `scale` or the returned object's
        ``stop()`` ends it. See `dispynb.deploy.adaptive`.
        """
        if self._closed:
            raise LaunchError("this launcher is closed")
        options = AdaptOptions(
            minimum=minimum,
            maximum=max(self.default_count, minimum) if maximum is None else maximum,
            idle_timeout=idle_timeout,
            interval=interval,
            cooldown=cooldown,
            cpus_per_node=cpus_per_node,
        )
        if self._adaptive is not None:
            self._adaptive.stop()
        self._adaptive = Adaptive(self, options)
        self._adaptive.start()
        return self._adaptive

    def _ensure_drainer(self) -> None:
        """Finish drains in the background (adapt's thread does it while it runs)."""
        with self._changed:
            draining = any(x.draining and not x.stopped for x in self._launched)
        if not draining or (self._adaptive is not None and self._adaptive.running):
            return
        options = AdaptOptions(maximum=1 << 30)
        drainer = Adaptive(self, options, only_drain=True)
        self._adaptive = drainer
        drainer.start()

    def _workloads(self) -> list[tuple[ScalableCluster, Workload]]:
        loads = []
        for cluster in self._clusters():
            try:
                loads.append((cluster, cluster.workload()))
            except Exception as exc:  # closing under us: it unsubscribes
                logger.debug("workload of %r: %s", cluster, exc)
        return loads

    def _cpus_per_node(self) -> int | None:
        """CPUs a node registered with (the latest seen), or None before any."""
        return self._known_cpus

    def _node_views(
        self, loads: list[tuple[ScalableCluster, Workload]], now: float
    ) -> tuple[list[NodeView], int]:
        """The active nodes for `plan`, and the jobs waiting or running on them;
        records when each node last had work."""
        with self._changed:
            active = self._active()
            draining = {
                x.node.spec for x in self._launched if x.draining and x.node is not None
            }
        jobs = 0
        for _, load in loads:
            jobs += load.waiting
            jobs += sum(
                w.jobs for spec, w in load.nodes.items() if spec not in draining
            )
        views = []
        for x in active:
            if x.node is None:
                views.append(NodeView(x.name, False, 0, None))
                continue
            spec = x.node.spec
            work = [load.nodes[spec] for _, load in loads if spec in load.nodes]
            busy = sum(w.jobs for w in work)
            done = sum(w.done for w in work)
            joining = len(work) < max(len(loads), 1) and now < x.joining_until
            if busy or done != x.done_seen or joining:
                x.last_busy = now
                x.done_seen = done
            idle = None if busy else now - x.last_busy
            views.append(NodeView(x.name, True, busy, idle))
        return views, jobs

    def _scale_up(self, count: int, why: str) -> None:
        names = self._runner.run_sync(self._start, count)
        for name in names:
            self._event("launch", name, why)

    def _drain(self, names: list[str], why: str) -> None:
        """Stop sending these nodes jobs; `_finish_drains` stops them once done."""
        with self._changed:
            chosen = [x for x in self._launched if x.name in names and not x.draining]
            for x in chosen:
                x.draining = True
        clusters = self._clusters()
        for x in chosen:
            self._event("drain", x.name, why)
            if x.node is None:
                continue  # still starting: in no cluster, stopped at the next look
            for cluster in clusters:
                cluster.close_node(x.node.spec)

    def _finish_drains(self, loads: list[tuple[ScalableCluster, Workload]]) -> int:
        """Stop the draining nodes no cluster has any more; return how many are
        still draining."""
        with self._changed:
            draining = [x for x in self._launched if x.draining and not x.stopped]
        left = 0
        for x in draining:
            spec = x.node.spec if x.node is not None else None
            holding = [(c, load) for c, load in loads if spec in load.nodes]
            for cluster, load in holding:
                if spec is not None and load.nodes[spec].cpus > 0:
                    cluster.close_node(spec)  # it set the node up after the drain
            if holding:
                left += 1
                continue
            with self._changed:
                x.stopped = True
            self._runner.call_soon(self._spawn_stop, x)
        return left

    def _spawn_stop(self, launched: Launched[Handle]) -> None:
        task = asyncio.get_running_loop().create_task(self._stop_drained(launched))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_drained(self, launched: Launched[Handle]) -> None:
        if launched.handle is not None:
            await self._stop(launched.handle)
        self._event("stopped", launched.name, "drained")

    def _reap_launches(self, now: float) -> tuple[int, int]:
        """``(failed, registered)``: launched nodes that ended or did not register
        within ``wait`` s (those are stopped), and that registered, since the last
        look."""
        failed = registered = 0
        with self._changed:
            fresh = [x for x in self._in_use() if not x.counted]
        for x in fresh:
            if x.node is not None:
                x.counted = True
                registered += 1
                continue
            why = self._reason(x)
            if why is None and now - x.launched_at < self.wait:
                continue
            x.counted = True
            failed += 1
            self._event("failed", x.name, why or f"no registration in {self.wait:g} s")
            if why is None:
                self._drain([x.name], "did not register")
        return failed, registered
