"""The Ray engine's actors: one per CPU used on each Ray node, set up with the
computation (`_rayworker.JobActor`); nodes that join the Ray cluster later get theirs;
an actor killed or crashed is restarted by Ray and set up again; closing runs
``cleanup`` in each and ends them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import time
from typing import TYPE_CHECKING, Any

from dispynb.backends._raystate import _Node, _RayState, _reason, _Slot, _terminated
from dispynb.backends.base import Departure, NodeInfo
from dispynb.errors import SetupError
from dispynb.protocol import serialize

if TYPE_CHECKING:
    from dispynb.tracebacks import LazySourceMap

logger = logging.getLogger("dispynb.backends.ray")

#: Seconds `RayEngine.open` waits for a first actor to be set up.
STARTUP_WAIT = 120.0

#: Seconds ``close`` gives the actors' cleanup.
CLOSE_WAIT = 30.0

#: Seconds between asks whether a restarting actor is up.
RETRY = 0.2

#: Seconds between looks for Ray nodes that joined the cluster.
NODE_POLL = 2.0


class _Actors(_RayState):
    """Start, watch, kill and close the actors of the computation."""

    def start(self) -> None:
        """Create the actors; block until one is set up, or raise why none can be."""
        from dispynb.backends import _rayworker

        ray = self._ray
        opts = self._config.options
        bundle = {
            "func": opts.computation,
            "setup": opts.setup,
            "cleanup": opts.cleanup if callable(opts.cleanup) else None,
            "setup_args": (),
            "names": dict(self._config.depends.names),
        }
        # Pickled by dispynb (functions of the user's own modules by value), once.
        buffers = [bytes(memoryview(b)) for b in serialize.dumps(bundle)]
        files = {ref.relative: ref.read() for ref in self._config.depends.files}
        # Owned here for the cluster's life: actors Ray restarts get them again.
        self._args_refs = (ray.put(buffers), ray.put(files))
        max_output = opts.max_output_size
        strategy = importlib.import_module("ray.util.scheduling_strategies")
        self._inbox, self._inbox_name = self._engine.inbox(ray)
        # The actors get them from the inbox (see `_rayworker.JobActor`).
        self._inbox.keep.remote(self._token, list(self._args_refs))
        # CONTROL: `JobActor.skip` runs while a job runs (see `_raycancels._ask_skip`).
        self._actor_class = ray.remote(concurrency_groups={_rayworker.CONTROL: 1})(
            _rayworker.JobActor
        )
        self._strategy = strategy.NodeAffinitySchedulingStrategy
        self._max_output = max_output
        for entry in ray.nodes():
            self._add_node(entry)
        if not self._slots:
            raise SetupError(
                "the Ray cluster has no node with a CPU: add nodes (ray start "
                "--address=...) or give the head CPUs (ray start --head --num-cpus=N)"
            )
        for slot in self._slots:
            self._check_ready(slot)
        self._runner.call_soon(self._poll_inbox)
        self._runner.call_soon(self._watch_nodes)
        try:
            self._startup.result(STARTUP_WAIT)
        except concurrent.futures.TimeoutError:
            raise SetupError(
                f"no Ray actor of the computation was set up within {STARTUP_WAIT} s: "
                "are the cluster's CPUs taken by other work?"
            ) from None

    def _add_node(self, entry: dict[str, Any]) -> _Node | None:
        """Make the actors of a live Ray node with CPUs (``ray.nodes()`` entry)."""
        cpus = int(entry.get("Resources", {}).get("CPU", 0))
        if not entry.get("Alive") or cpus < 1 or entry["NodeID"] in self._nodes:
            return None
        if self._engine.cpus is not None:
            cpus = min(cpus, self._engine.cpus)
        node = _Node(
            entry["NodeID"],
            entry.get("NodeManagerAddress", ""),
            int(entry.get("NodeManagerPort", 0)),
        )
        self._nodes[node.ray_id] = node
        self._no_worker = None  # its actors may run the jobs
        for _ in range(cpus):
            handle = self._actor_class.options(
                num_cpus=1,
                max_restarts=-1,
                max_task_retries=0,
                scheduling_strategy=self._strategy(node.ray_id, soft=False),
            ).remote(self._inbox_name, self._max_output, self._token)
            slot = _Slot(handle, node)
            node.slots.append(slot)
            self._slots.append(slot)
        return node

    def _watch_nodes(self) -> None:
        """Every `NODE_POLL` seconds: set the computation up on Ray nodes that
        joined the cluster since (``ray.nodes()`` asks the GCS: off the loop)."""
        if self._closed:
            return
        future = self._runner.loop.run_in_executor(None, self._ray.nodes)
        future.add_done_callback(self._nodes_listed)

    def _nodes_listed(self, fut: asyncio.Future[list[dict[str, Any]]]) -> None:
        if self._closed:
            return
        try:
            entries = fut.result()
        except Exception as exc:  # the GCS is briefly unreachable: ask again later
            logger.debug("cannot list the Ray nodes: %s", exc)
            entries = []
        for entry in entries:
            node = self._add_node(entry)
            if node is not None:
                logger.info("Ray node %s joined: setting the computation up", node.host)
                for slot in node.slots:
                    self._check_ready(slot)
        self._runner.loop.call_later(NODE_POLL, self._watch_nodes)

    def _check_ready(self, slot: _Slot) -> None:
        future = slot.handle.ready.remote().future()
        future.add_done_callback(lambda fut: self._post(self._slot_checked, slot, fut))

    def _slot_checked(self, slot: _Slot, fut: concurrent.futures.Future[Any]) -> None:
        if self._closed or slot.dead:
            return
        try:
            pid, hostname, platform, failure = fut.result()
        except self._ray.exceptions.ActorUnavailableError:
            # Restarting (after a kill or a crash): ask again once it may be up.
            self._runner.loop.call_later(RETRY, self._check_ready, slot)
            return
        except Exception as exc:
            self._slot_dead(slot, _reason(exc))
            return
        if failure is not None:  # its setup failed: it holds a CPU for nothing
            self._end_actor(slot)
            if self._startup.done():  # (at the start, `JobCluster` raises it)
                reason, remote_traceback = failure
                _warn_setup_failed(slot, reason, remote_traceback, self._config.sources)
            self._slot_dead(slot, *failure)
            return
        slot.ready, slot.pid = True, pid
        node = slot.node
        if node.info is None:
            node.info = NodeInfo(
                node_id=node.ray_id,
                host=node.host,
                port=node.port,
                name=hostname,
                cpus=len(node.slots),
                platform=platform,
            )
            self._events.node_ready(node.info)
        if not self._startup.done():
            self._startup.set_result(None)
        self._schedule()

    def _slot_dead(self, slot: _Slot, reason: str, remote_traceback: str = "") -> None:
        """An actor cannot be used any more (setup failed, its node is gone);
        ``remote_traceback``: setup's, if it raised."""
        slot.dead = True
        slot.ready = False
        self._fail_inflight(slot, reason)
        self._settle_lost_slot(slot)  # (its jobs of an earlier death)
        node = slot.node
        if not self._startup.done():
            self._setup_errors.append((reason, remote_traceback))
            if all(s.dead for s in self._slots):
                first, shown = self._setup_errors[0]
                self._startup.set_exception(
                    SetupError(
                        "the computation could not be set up on the Ray cluster: "
                        + first,
                        shown,
                    )
                )
                return
        if all(s.dead for s in node.slots) and not node.closed:
            node.closed = True
            for job in self._pinned.pop(node.ray_id, ()):
                self._forget(job.key)
                self._events.job_abandoned(
                    job.key, node.info, f"its Ray node (submit_node) left: {reason}"
                )
            if node.info is not None:
                logger.warning("Ray node %s left: %s", node.host, reason)
                self._events.node_closed(node.info, reason, Departure.LOST)
        if all(s.dead for s in self._slots):
            self._no_worker = f"no Ray worker is left to run it: {reason}"
            self._take_incoming()
            self._abandon_waiting()

    def _abandon_waiting(self) -> None:
        """No actor is left (`_no_worker` says why): the jobs waiting here end
        Abandoned, as those submitted later do (`_rayjobs._schedule`), until a Ray
        node joins (`_add_node`)."""
        pinned = [job for queue in self._pinned.values() for job in queue]
        self._pinned.clear()
        for job in [*self._queue, *pinned]:
            self._forget(job.key)
            self._events.job_abandoned(job.key, None, str(self._no_worker))
        self._queue.clear()

    def _end_actor(self, slot: _Slot) -> None:
        """End ``slot``'s actor for good (Ray does not restart it)."""
        try:
            self._ray.kill(slot.handle, no_restart=True)
        except Exception as exc:
            logger.debug("Ray actor already gone: %s", exc)

    def _kill(self, slot: _Slot, key: int, timed_out: bool = False) -> None:
        """Stop the job running on ``slot`` by killing its actor (Ray restarts it)."""
        if slot.killed_for is not None:
            return
        slot.killed_for = key
        slot.ready = False
        self._cancel_timer(slot)
        if timed_out:
            self._timed_out_keys.add(key)
        try:
            self._ray.kill(slot.handle, no_restart=False)
        except Exception as exc:
            logger.warning("cannot kill Ray actor for job %d: %s", key, exc)

    def _actor_lost(self, slot: _Slot, reason: str) -> None:
        """``slot``'s actor died: settle its calls, then wait for its restart."""
        slot.ready = False
        self._fail_inflight(slot, reason)
        if not slot.dead and not self._closed:
            self._check_ready(slot)  # Ray restarts it; it runs setup again

    def close(self, terminate: bool) -> None:
        """Run cleanup on the actors, then end them and the inbox (bounded)."""
        if self._closed:
            return
        try:
            idle = self._runner.run_sync(self._close_on_loop, terminate, timeout=30)
        except (TimeoutError, RuntimeError) as exc:
            logger.warning("closing the Ray cluster's jobs: %s", exc)
            idle = list(self._slots)
            self._closed = True
        self._cleanup(idle)
        for slot in self._slots:
            self._end_actor(slot)
        if self._inbox is not None:  # the engine's: only this cluster's messages go
            try:
                self._inbox.drop.remote(self._token)
            except Exception as exc:
                logger.debug("the Ray inbox is gone: %s", exc)

    def _cleanup(self, slots: list[_Slot]) -> None:
        """Run cleanup in the actors of ``slots`` (within `CLOSE_WAIT`). An actor
        Ray is restarting (its job was stopped just before) refuses calls until
        its setup has run again: its cleanup is asked again until then."""
        ray = self._ray
        deadline = time.monotonic() + CLOSE_WAIT
        while slots:
            cleanups = {}
            for slot in slots:
                try:
                    cleanups[slot.handle.cleanup.remote()] = slot
                except Exception as exc:
                    logger.warning("cleanup not started on a Ray actor: %s", exc)
            left = max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(
                list(cleanups), num_returns=len(cleanups), timeout=left
            )
            slots = []
            for ref in done:
                try:
                    error = ray.get(ref)
                except ray.exceptions.ActorUnavailableError as exc:
                    if time.monotonic() + RETRY < deadline:
                        slots.append(cleanups[ref])
                        continue
                    error = _reason(exc)
                except Exception as exc:
                    error = _reason(exc)
                if error:
                    sources = self._config.sources  # the user's files and lines
                    if sources is not None:
                        error = sources.rerender(error) or error
                    logger.warning("cleanup failed on a Ray worker: %s", error)
            if pending:
                logger.warning(
                    "cleanup did not finish within %s s on %d Ray workers",
                    CLOSE_WAIT,
                    len(pending),
                )
            if slots:
                time.sleep(RETRY)  # the restarting actors' setup takes a moment

    async def _close_on_loop(self, terminate: bool) -> list[_Slot]:
        """Settle every job (none may be left), report the nodes released; the
        actors whose cleanup can run."""
        self._schedule()
        self._take_incoming()
        pinned = [job for queue in self._pinned.values() for job in queue]
        for job in [*self._queue, *pinned]:
            self._forget(job.key)
            self._events.job_cancelled(job.key)
        self._queue.clear()
        self._pinned.clear()
        idle = []
        for slot in self._slots:
            if slot.dead:
                continue
            running = slot.inflight[0][2] if slot.inflight else None
            for key, _, ref in slot.inflight:
                self._forget(key)
                if ref is running:
                    self._events.job_done(
                        key,
                        slot.node.info,
                        _terminated("job terminated: the cluster was closed\n"),
                    )
                else:
                    self._events.job_cancelled(key)
            if slot.inflight:
                slot.inflight.clear()
            else:  # set up, or being set up: cleanup runs after its setup
                idle.append(slot)
            self._cancel_timer(slot)
        for key in list(self._held):
            self._release(key)
        for key, (dead, *_) in list(self._dying.items()):
            self._forget(key)
            self._events.job_done(
                key,
                dead.node.info,
                _terminated("job terminated: the cluster was closed\n"),
            )
        self._where.clear()
        self._closed = True
        for node in self._nodes.values():
            if node.info is not None and not node.closed:
                node.closed = True
                self._events.node_closed(
                    node.info, "cluster closed", Departure.RELEASED
                )
        return idle


def _warn_setup_failed(
    slot: _Slot, reason: str, remote_traceback: str, sources: LazySourceMap | None
) -> None:
    """Say that setup failed in an actor Ray restarted (after a stopped job, or a
    job that ended its process): it runs no more jobs, and the cluster has one CPU
    less, which nothing else would tell. Setup's frames name the user's file and
    line (``sources``), as in a local traceback."""
    if sources is not None:
        remote_traceback = sources.rerender(remote_traceback) or ""
    shown = "\n".join(filter(None, (reason, remote_traceback)))
    logger.warning(
        "setup failed on a Ray worker of node %s, restarted after its job was "
        "stopped or ended its process; that worker runs no more jobs: %s",
        slot.node.host,
        shown,
    )
