"""dispynb's jobs on an existing Ray cluster: ``JobCluster(f, engine=RayEngine(ADDR))``.

How dispy's features map onto Ray's own mechanisms
--------------------------------------------------
* **Workers and setup.** Each CPU the cluster uses is one Ray actor
  (`_rayworker.JobActor`, ``num_cpus=1``, pinned to its Ray node with a hard
  ``NodeAffinitySchedulingStrategy``). Its constructor is dispy's set-up of a node:
  a directory of its own holding the ``depends`` files, the computation (pickled
  by dispynb, by value) with dispy's names in its globals, then ``setup``. Its
  ``cleanup`` method runs dispy's ``cleanup`` when the cluster closes. A Ray node is
  a dispy node: it is ready when its first actor is set up.
* **Jobs** are calls of the actor's ``run`` method, two in flight per actor (Ray
  runs an actor's calls in order, so the first is the running job and the second
  waits on the worker, which hides the round trip). Arguments and results travel
  with Ray's own serialization (its object store for large ones).
* **Stop / cancel.** A job waiting here is dropped; one waiting on an actor is
  cancelled with ``ray.cancel`` (Ray drops a pending actor task); Ray cannot
  interrupt a running actor task, so the running job's actor is killed with
  ``ray.kill(actor, no_restart=False)``: the job ends ``Terminated`` and Ray
  restarts the actor (``max_restarts=-1``), which runs ``setup`` again.
* **Worker death.** When an actor dies (its process killed, its node lost), its
  calls fail with ``RayActorError``: the running job is run again elsewhere if the
  cluster is ``reentrant``, otherwise it ends ``Abandoned`` as dispy's jobs of a
  lost node do; jobs that had not started are simply queued again. Ray restarts the
  actor; a node whose actors all died for good (its node is gone) is closed.
* **Provisional results and files from jobs** go through an asynchronous actor of
  the cluster (`_rayworker.Inbox`) that the client long-polls; each job's outcome
  says how many it sent, so they all reach the job before its final result.
* **stdout/stderr** of a job are captured in the actor for that job (as on
  dispynb's own nodes) and come back with its outcome.

* **submit_node** jobs wait in a queue of their Ray node and go only to its actors
  (which are pinned there); they are abandoned if that node leaves.
* **Nodes that join** the Ray cluster after the `JobCluster` opened are found by
  asking ``ray.nodes()`` every `NODE_POLL` seconds: they get their actors (hence the
  computation's setup) and then jobs, like the nodes present at the start.
* **job_timeout / mem_limit** (and ``dispy_job_timeout`` / ``dispy_job_mem_limit``):
  the client kills the actor of a job that runs too long (it ends ``Terminated``);
  the actor lowers its ``RLIMIT_AS`` for the job's run.

Not available on Ray (`NotSupportedError` from ``JobCluster``): program files,
node management, ``send_file``, ``dispy_job_depends``, ``recover_file``. ``ray`` is
imported only when a cluster opens (the ``dispynb[ray]`` extra); the Ray workers need
dispynb installed too.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dispynb._loop import Coalescer
from dispynb.backends import base
from dispynb.backends.base import (
    ClusterConfig,
    Departure,
    JobEvents,
    JobRequest,
    NodeInfo,
    Outcome,
)
from dispynb.errors import (
    ConfigurationError,
    DispynbError,
    NotSupportedError,
    SerializationError,
    SetupError,
    TransportError,
)
from dispynb.job import JobStatus
from dispynb.protocol import serialize
from dispynb.protocol.files import write_inside

logger = logging.getLogger(__name__)

#: Calls of ``run`` in flight per actor: the running job and the next one.
DEPTH = 2

#: Seconds `RayEngine.open` waits for a first actor to be set up.
STARTUP_WAIT = 120.0

#: Seconds ``close`` gives the actors' cleanup.
CLOSE_WAIT = 30.0

#: Seconds a job's outcome waits for the provisional results it says it sent.
PROVISIONAL_WAIT = 10.0

#: Seconds between asks whether a restarting actor is up.
RETRY = 0.2

#: Seconds each long poll of the inbox lasts.
POLL = 1.0

#: Seconds between looks for Ray nodes that joined the cluster.
NODE_POLL = 2.0

_PLAIN = frozenset({int, float, str, bytes, bytearray, bool, type(None), complex})


def _ray() -> Any:
    """The ``ray`` module, or a `ConfigurationError` saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigurationError(
            f"the Ray engine needs the ray package ({exc}): pip install 'dispynb[ray]'"
        ) from exc


class RayEngine:
    """Run a `JobCluster`'s jobs on a Ray cluster.

    Parameters
    ----------
    address:
        What ``ray.init(address=...)`` takes: ``'HOST:PORT'`` of the cluster's head
        (its GCS), ``'ray://HOST:10001'`` (Ray Client), ``'auto'``; None starts a
        local Ray in this process. If this process is already connected to Ray
        (``ray.init`` was called), that connection is used and ``address`` is
        ignored.
    cpus:
        CPUs (actors, one job each at a time) to use on each Ray node; None: all of
        the node's ``CPU`` resource.
    init_options:
        More keyword arguments for ``ray.init`` (``namespace``, ``runtime_env``...).

    Examples
    --------
    >>> engine = RayEngine("10.0.0.1:6379")
    >>> cluster = JobCluster(compute, engine=engine)  # doctest: +SKIP
    """

    name = "ray"
    features: frozenset[str] = frozenset(
        {base.SETUP, base.JOB_LIMITS, base.SUBMIT_NODE, base.NODE_JOBS}
    )

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus: int | None = None,
        init_options: dict[str, Any] | None = None,
    ) -> None:
        if cpus is not None and cpus < 1:
            raise ConfigurationError(f"cpus must be at least 1, not {cpus}")
        self.address = address
        self.cpus = cpus
        self.init_options = dict(init_options or {})
        self._connected = False  # this engine made the process's Ray connection

    def connect(self) -> Any:
        """Connect this process to the Ray cluster (once); the ``ray`` module."""
        ray = _ray()
        if ray.is_initialized():
            return ray
        options: dict[str, Any] = {
            "logging_level": logging.WARNING,
            "log_to_driver": False,
            "include_dashboard": False,
        }
        if self.address is not None:
            options.pop("include_dashboard")  # only for a Ray started here
        options.update(self.init_options)
        try:
            ray.init(address=self.address, **options)
            self._connected = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or "a local Ray"
            raise TransportError(
                f"cannot connect to the Ray cluster at {where}: {exc} (is "
                "`ray start --head` running there, with the same Ray version? with "
                "token authentication, set RAY_AUTH_MODE=token and the cluster's "
                "token here too)"
            ) from exc
        return ray

    def close(self) -> None:
        """Disconnect this process from Ray if this engine connected it (``%dispy
        close`` does); clusters still open on it stop working."""
        if self._connected:
            self._connected = False
            _ray().shutdown()

    def open(self, events: JobEvents, config: ClusterConfig) -> RayBackend:
        """Set the computation up on the Ray cluster; return once a worker is ready."""
        if not callable(config.options.computation):
            raise NotSupportedError(
                "a program file is not supported on the 'ray' engine: give a Python "
                "function (it may run the program with subprocess)"
            )
        ray = self.connect()
        backend = RayBackend(ray, self, events, config)
        try:
            backend.start()
        except BaseException:
            backend.close(terminate=True)
            raise
        return backend

    def __repr__(self) -> str:
        return f"RayEngine({self.address!r})"


@dataclass(eq=False)
class _Node:
    """A Ray node and the actors of this cluster on it."""

    ray_id: str
    host: str
    port: int
    slots: list[_Slot] = field(default_factory=list)
    info: NodeInfo | None = None  # set when its first actor is ready
    closed: bool = False


@dataclass(eq=False)
class _Slot:
    """One actor: a worker running one job at a time."""

    handle: Any
    node: _Node
    #: (key, attempt, ref) of the calls sent to it, in the order it runs them.
    inflight: collections.deque[tuple[int, int, Any]] = field(
        default_factory=collections.deque
    )
    ready: bool = False
    dead: bool = False
    pid: int = 0  # of the actor's process, once set up
    #: The key whose cancel killed the actor (its job ends Terminated).
    killed_for: int | None = None
    #: The running job's ``job_timeout`` timer.
    timer: Any = None


class RayBackend(base.EngineManagedNodes):
    """One `JobCluster`'s computation on a Ray cluster (from `RayEngine.open`).

    All state lives on the façade's I/O loop: Ray's completion callbacks (on Ray's
    threads) and `submit`/`cancel` (any thread) hand over to it.
    """

    engine_name = "ray"
    scale_hint = (
        "Ray manages its nodes (add one with `ray start --address=...`: it gets "
        "the computation and jobs)"
    )

    def __init__(
        self, ray: Any, engine: RayEngine, events: JobEvents, config: ClusterConfig
    ) -> None:
        self._ray = ray
        self._engine = engine
        self._events = events
        self._config = config
        self._runner = config.runner
        opts = config.options
        self._reentrant = opts.reentrant
        self._files_dir = opts.files_dir
        self._queue: collections.deque[JobRequest] = collections.deque()
        #: Jobs of ``submit_node`` waiting for their node, by Ray node id.
        self._pinned: dict[str, collections.deque[JobRequest]] = {}
        self._incoming: collections.deque[JobRequest] = collections.deque()
        self._jobs: dict[int, JobRequest] = {}  # queued or in flight
        self._where: dict[int, _Slot] = {}  # in flight
        self._attempts: dict[int, int] = {}
        #: Keys to cancel, killing their actor if they run / only if not started.
        self._cancelling: set[int] = set()
        self._unstarted_cancels: set[int] = set()
        #: Keys taken back from an actor for an idle one (see `_steal`).
        self._stolen: set[int] = set()
        self._timed_out_keys: set[int] = set()
        self._to_cancel: collections.deque[tuple[list[int], bool]] = collections.deque()
        self._started: set[tuple[int, int]] = set()  # (key, attempt) reported running
        self._sent: dict[int, int] = {}  # inbox messages received per key
        self._held: dict[int, tuple[_Node, Outcome, int, Any]] = {}
        self._nodes: dict[str, _Node] = {}
        self._slots: list[_Slot] = []
        self._next_slot = 0
        self._completions: collections.deque[tuple[_Slot, int, int, Any]] = (
            collections.deque()
        )
        self._completions_lock = threading.Lock()
        self._pump = Coalescer(self._runner, self._schedule)
        self._closed = False
        self._startup: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._setup_errors: list[str] = []
        self._inbox: Any = None
        self._actor_class: Any = None
        self._strategy: Any = None
        self._max_output: int | str | None = None
        self._args_refs: tuple[Any, ...] = ()
        #: Inbox messages that arrived ahead of an earlier one of their job (an
        #: asynchronous actor does not keep the order of calls): by key, by number.
        self._early: dict[int, dict[int, tuple[str, Any]]] = {}

    # -- start-up --

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
        # Kept for the cluster's life: Ray restarts actors with these arguments.
        self._args_refs = (ray.put(buffers), ray.put(files))
        max_output = opts.max_output_size
        strategy = importlib.import_module("ray.util.scheduling_strategies")
        # On this process's node if it is one (a lost worker node loses no message).
        here = ray.get_runtime_context().get_node_id()
        self._inbox = (
            ray.remote(_rayworker.Inbox)
            .options(
                num_cpus=0,
                max_concurrency=64,
                scheduling_strategy=strategy.NodeAffinitySchedulingStrategy(
                    here, soft=True
                ),
            )
            .remote()
        )
        self._actor_class = ray.remote(_rayworker.JobActor)
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
        bundle_ref, files_ref = self._args_refs
        for _ in range(cpus):
            handle = self._actor_class.options(
                num_cpus=1,
                max_restarts=-1,
                max_task_retries=0,
                scheduling_strategy=self._strategy(node.ray_id, soft=False),
            ).remote(bundle_ref, files_ref, self._inbox, self._max_output)
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

    def _post(self, fn: Any, *args: Any) -> None:
        """From Ray's threads: run ``fn(*args)`` on the loop, unless closed."""
        if self._closed:
            return
        # RuntimeError: the loop ended with the last cluster, nothing to tell.
        with contextlib.suppress(RuntimeError):
            self._runner.call_soon(fn, *args)

    def _check_ready(self, slot: _Slot) -> None:
        future = slot.handle.ready.remote().future()
        future.add_done_callback(lambda fut: self._post(self._slot_checked, slot, fut))

    def _slot_checked(self, slot: _Slot, fut: concurrent.futures.Future[Any]) -> None:
        if self._closed or slot.dead:
            return
        try:
            pid, hostname, platform = fut.result()
        except self._ray.exceptions.ActorUnavailableError:
            # Restarting (after a kill or a crash): ask again once it may be up.
            self._runner.loop.call_later(RETRY, self._check_ready, slot)
            return
        except Exception as exc:
            self._slot_dead(slot, _reason(exc))
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

    def _slot_dead(self, slot: _Slot, reason: str) -> None:
        """An actor cannot be used any more (setup failed, its node is gone)."""
        slot.dead = True
        slot.ready = False
        self._fail_inflight(slot, reason)
        node = slot.node
        if not self._startup.done():
            self._setup_errors.append(reason)
            if all(s.dead for s in self._slots):
                self._startup.set_exception(
                    SetupError(
                        "the computation could not be set up on the Ray cluster: "
                        + self._setup_errors[0]
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
            self._take_incoming()
            pinned = [job for queue in self._pinned.values() for job in queue]
            self._pinned.clear()
            for job in [*self._queue, *pinned]:
                self._jobs.pop(job.key, None)
                self._events.job_abandoned(
                    job.key, None, f"no Ray worker is left to run it: {reason}"
                )
            self._queue.clear()

    # -- jobs --

    def prepare(self, job: JobRequest) -> None:
        """Check that the arguments pickle (values of plain types are not pickled
        twice: Ray pickles them once on the way)."""
        if job.depends:
            raise NotSupportedError(
                "dispy_job_depends is not supported on the 'ray' engine: give the "
                "cluster's depends, or pass the data as arguments"
            )
        for index, value in enumerate(job.args):
            _check_picklable(value, f"argument {index}")
        for name, value in job.kwargs.items():
            _check_picklable(value, f"keyword argument {name!r}")

    def submit(self, job: JobRequest) -> None:
        self._incoming.append(job)  # deque.append is atomic
        self._pump.trigger()

    def cancel(
        self, keys: list[int], unstarted: bool = False, held: bool = False
    ) -> None:
        if held:  # on the loop thread: only jobs no actor has, reported now
            self._take_incoming()
            self._cancel_queued(set(keys))
            return
        self._to_cancel.append((list(keys), unstarted))
        self._pump.trigger()

    def node_load(self) -> dict[str, tuple[int, int]]:
        """``(cpus, jobs)`` of each Ray node set up: its live actors, the jobs
        handed to them."""
        if self._runner.in_loop_thread():
            return self._load()

        async def load() -> dict[str, tuple[int, int]]:
            return self._load()

        return self._runner.run_sync(load, timeout=30)

    def running_jobs(self, node_id: str) -> list[int]:
        """Keys of the jobs running on a Ray node now (the first call of each of
        its actors)."""

        async def keys() -> list[int]:
            node = self._nodes.get(node_id)
            if node is None:
                return []
            return sorted(s.inflight[0][0] for s in node.slots if s.inflight)

        return self._runner.run_sync(keys, timeout=30)

    def _load(self) -> dict[str, tuple[int, int]]:
        return {
            node.ray_id: (
                0 if node.closed else sum(1 for s in node.slots if not s.dead),
                sum(len(s.inflight) for s in node.slots),
            )
            for node in self._nodes.values()
            if node.info is not None
        }

    def _take_incoming(self) -> None:
        incoming = self._incoming
        while incoming:
            job = incoming.popleft()
            self._jobs[job.key] = job
            self._enqueue(job)

    def _enqueue(self, job: JobRequest, first: bool = False) -> None:
        """Queue ``job`` here: for any node, or for its own (``submit_node``)."""
        if job.node_id is None:
            queue = self._queue
        else:
            node = self._nodes.get(job.node_id)
            if node is None or node.closed:
                self._forget(job.key)
                self._events.job_abandoned(
                    job.key,
                    node.info if node is not None else None,
                    "its Ray node (submit_node) has left the cluster",
                )
                return
            queue = self._pinned.setdefault(job.node_id, collections.deque())
        if first:
            queue.appendleft(job)
        else:
            queue.append(job)

    def _next_job(self, slot: _Slot) -> JobRequest | None:
        """The job ``slot`` runs next: one for its node first, then any."""
        if self._pinned:
            pinned = self._pinned.get(slot.node.ray_id)
            if pinned:
                return pinned.popleft()
        return self._queue.popleft() if self._queue else None

    def _schedule(self) -> None:
        """On the loop: take in new jobs and cancels, then feed idle actors."""
        if self._closed:
            return
        self._take_incoming()
        while self._to_cancel:
            keys, unstarted = self._to_cancel.popleft()
            for key in self._cancel_queued(set(keys)):
                self._cancel_sent(key, unstarted)
        if self._pinned:
            self._pinned = {k: q for k, q in self._pinned.items() if q}
        if not self._queue and not self._pinned:
            self._steal()
            return
        slots = [s for s in self._slots if s.ready and len(s.inflight) < DEPTH]
        if not slots:
            return
        # Fill the emptiest actors first: one job each, then a second one each, but
        # only once every actor is up (a job queued behind a running one would wait
        # for it while an actor still being set up becomes free).
        slots.sort(key=lambda s: len(s.inflight))
        starting = any(not s.ready and not s.dead for s in self._slots)
        for depth in range(1 if starting else DEPTH):
            for slot in slots:
                if len(slot.inflight) <= depth:
                    job = self._next_job(slot)
                    if job is None:
                        if not self._pinned and not self._queue:
                            return
                        continue
                    self._send(slot, job)

    def _steal(self) -> None:
        """Nothing waits here but an actor is idle: take back a job waiting behind
        another actor's running job (``ray.cancel`` drops it there; it is queued
        again here when Ray confirms), so that it does not wait for that job."""
        idle = sum(1 for s in self._slots if s.ready and not s.inflight)
        if not idle:
            return
        for slot in self._slots:
            if idle == 0:
                return
            if len(slot.inflight) < 2:
                continue
            key, _, ref = slot.inflight[-1]
            if key in self._stolen or key in self._cancelling:
                continue
            job = self._jobs.get(key)
            if job is None or job.node_id is not None:  # it may run only there
                continue
            self._stolen.add(key)
            self._ray.cancel(ref)
            idle -= 1

    def _send(self, slot: _Slot, job: JobRequest) -> None:
        key = job.key
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        try:
            ref = slot.handle.run.remote(
                key, attempt, job.args, job.kwargs, job.mem_limit
            )
        except Exception as exc:  # Ray could not serialize the arguments
            self._jobs.pop(key, None)
            now = time.time()
            self._events.job_done(
                key,
                None,
                Outcome(
                    JobStatus.Terminated,
                    exception=f"the job's arguments could not be sent to Ray: {exc}\n",
                    start_time=now,
                    end_time=now,
                ),
            )
            return
        slot.inflight.append((key, attempt, ref))
        self._where[key] = slot
        self._sent.pop(key, None)
        self._early.pop(key, None)
        ref.future().add_done_callback(
            lambda fut: self._completed(slot, key, attempt, fut)
        )
        if len(slot.inflight) == 1:
            self._started_running(slot)

    def _completed(
        self, slot: _Slot, key: int, attempt: int, fut: concurrent.futures.Future[Any]
    ) -> None:
        """On a Ray thread: hand the completion to the loop (one wake-up per batch)."""
        with self._completions_lock:
            wake = not self._completions
            self._completions.append((slot, key, attempt, fut))
        if wake:
            self._post(self._drain_completions)

    def _drain_completions(self) -> None:
        with self._completions_lock:
            batch = list(self._completions)
            self._completions.clear()
        for slot, key, attempt, fut in batch:
            self._done(slot, key, attempt, fut)
        self._schedule()

    def _done(
        self, slot: _Slot, key: int, attempt: int, fut: concurrent.futures.Future[Any]
    ) -> None:
        if self._closed or self._where.get(key) is not slot:
            return
        if self._attempts.get(key) != attempt:
            return
        ray = self._ray
        try:
            reply = fut.result()
        except ray.exceptions.TaskCancelledError:
            self._remove(slot, key)
            if key in self._stolen and not (
                key in self._cancelling or key in self._unstarted_cancels
            ):  # taken back for an idle actor
                self._stolen.discard(key)
                self._enqueue(self._jobs[key], first=True)
                return
            self._forget(key)
            self._events.job_cancelled(key)
            return
        except ray.exceptions.RayActorError as exc:
            self._actor_lost(slot, _reason(exc))
            return
        except Exception as exc:  # the call failed in Ray (a result Ray cannot pickle)
            self._remove(slot, key)
            self._forget(key)
            now = time.time()
            self._events.job_done(
                key,
                slot.node.info,
                Outcome(
                    JobStatus.Terminated,
                    exception=f"{_reason(exc)}\n",
                    start_time=now,
                    end_time=now,
                ),
            )
            return
        self._remove(slot, key)
        code, result, stdout, stderr, exception, start, end, sent = reply
        from dispynb.backends._rayworker import FINISHED

        outcome = Outcome(
            JobStatus.Finished if code == FINISHED else JobStatus.Terminated,
            result=result,
            stdout=stdout,
            stderr=stderr,
            exception=exception,
            start_time=start,
            end_time=end,
        )
        if (key, attempt) not in self._started:
            self._events.job_running(key, slot.node.info or self._view(slot), start)
        if sent > self._sent.get(key, 0):
            # Its provisional results are still on their way through the inbox.
            timer = self._runner.loop.call_later(PROVISIONAL_WAIT, self._release, key)
            self._held[key] = (slot.node, outcome, sent, timer)
            return
        self._forget(key)
        self._events.job_done(key, slot.node.info, outcome)

    def _release(self, key: int) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        node, outcome, _, timer = held
        timer.cancel()
        self._forget(key)
        self._events.job_done(key, node.info, outcome)

    def _remove(self, slot: _Slot, key: int) -> None:
        """Take ``key`` out of its actor's calls; report the start of the next one."""
        inflight = slot.inflight
        was_head = bool(inflight) and inflight[0][0] == key
        for index, item in enumerate(inflight):
            if item[0] == key:
                del inflight[index]
                break
        self._where.pop(key, None)
        self._cancel_timer(slot)
        if was_head and inflight:
            self._started_running(slot)

    def _started_running(self, slot: _Slot) -> None:
        """The first call of ``slot`` runs now: report it, enforce its limits."""
        key, attempt, _ = slot.inflight[0]
        if key in self._cancelling:
            self._kill(slot, key)  # its cancel came too late to drop it
            return
        # (A key taken back stays so: Ray's answer to the cancel says whether it
        # ran, its result or TaskCancelledError.)
        if (key, attempt) not in self._started:
            self._started.add((key, attempt))
            self._events.job_running(
                key, slot.node.info or self._view(slot), time.time()
            )
        timeout = self._jobs[key].timeout if key in self._jobs else None
        if timeout is not None:
            slot.timer = self._runner.loop.call_later(
                timeout, self._timed_out, slot, key
            )

    def _cancel_timer(self, slot: _Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None

    def _timed_out(self, slot: _Slot, key: int) -> None:
        slot.timer = None
        if slot.inflight and slot.inflight[0][0] == key:
            self._kill(slot, key, timed_out=True)

    def _forget(self, key: int) -> None:
        self._jobs.pop(key, None)
        self._attempts.pop(key, None)
        self._cancelling.discard(key)
        self._unstarted_cancels.discard(key)
        self._stolen.discard(key)
        self._timed_out_keys.discard(key)
        self._sent.pop(key, None)
        self._early.pop(key, None)
        self._started = {item for item in self._started if item[0] != key}

    def _view(self, slot: _Slot) -> NodeInfo:
        node = slot.node
        return NodeInfo(node.ray_id, node.host, node.port, "", len(node.slots))

    # -- cancel, kill, loss --

    def _cancel_queued(self, keys: set[int]) -> set[int]:
        """Cancel the jobs of ``keys`` waiting here (one pass); the other keys."""
        if not keys or not (self._queue or self._pinned):
            return keys
        found: list[int] = []

        def keep(queue: collections.deque[JobRequest]) -> collections.deque[JobRequest]:
            kept: collections.deque[JobRequest] = collections.deque()
            for job in queue:
                if job.key in keys:
                    found.append(job.key)
                else:
                    kept.append(job)
            return kept

        self._queue = keep(self._queue)
        self._pinned = {node: keep(queue) for node, queue in self._pinned.items()}
        for key in found:
            self._forget(key)
            self._events.job_cancelled(key)
        return keys.difference(found)

    def _cancel_sent(self, key: int, unstarted: bool) -> None:
        """Cancel a job handed to an actor: drop it there if it has not started;
        kill its actor if it runs (unless ``unstarted``: then it runs on)."""
        slot = self._where.get(key)
        if slot is None or key not in self._jobs or key in self._held:
            return
        if slot.inflight and slot.inflight[0][0] == key:
            if not unstarted:
                self._cancelling.add(key)
                self._kill(slot, key)
            return
        (self._unstarted_cancels if unstarted else self._cancelling).add(key)
        for item_key, _, ref in slot.inflight:
            if item_key == key:
                self._ray.cancel(ref)  # a pending actor task: Ray drops it

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

    def _fail_inflight(self, slot: _Slot, reason: str) -> None:
        killed_for, slot.killed_for = slot.killed_for, None
        self._cancel_timer(slot)
        calls = list(slot.inflight)
        slot.inflight.clear()
        requeue: list[JobRequest] = []
        now = time.time()
        for index, (key, _, _) in enumerate(calls):
            self._where.pop(key, None)
            job = self._jobs.get(key)
            if job is None:
                continue
            if index == 0 and (key == killed_for or key in self._cancelling):
                timed_out = key in self._timed_out_keys
                self._forget(key)
                why = (
                    "job_timeout: the job ran longer than its limit"
                    if timed_out
                    else "cancelled at the client's request"
                )
                self._events.job_done(
                    key,
                    slot.node.info,
                    Outcome(
                        JobStatus.Terminated,
                        exception=f"job terminated ({why}): its Ray actor was killed\n",
                        start_time=now,
                        end_time=now,
                    ),
                )
            elif index and (key in self._cancelling or key in self._unstarted_cancels):
                self._forget(key)
                self._events.job_cancelled(key)
            elif index == 0 and not self._reentrant:
                self._forget(key)
                self._events.job_abandoned(
                    key,
                    slot.node.info or self._view(slot),
                    f"its Ray worker died while it ran ({reason}); the cluster is "
                    "not reentrant, so the job is not run again",
                )
            else:
                if index == 0:
                    self._events.job_requeued(key)
                self._stolen.discard(key)
                requeue.append(job)
        for job in reversed(requeue):
            self._enqueue(job, first=True)

    # -- the inbox: provisional results and files --

    def _poll_inbox(self) -> None:
        if self._closed:
            return
        future = self._inbox.take.remote(POLL).future()
        future.add_done_callback(lambda fut: self._post(self._inbox_items, fut))

    def _inbox_items(self, fut: concurrent.futures.Future[Any]) -> None:
        if self._closed:
            return
        try:
            items = fut.result()
        except Exception as exc:
            logger.warning("provisional results are lost: the inbox failed: %s", exc)
            for key in list(self._held):
                self._release(key)
            return
        for key, attempt, number, kind, value in items:
            if self._attempts.get(key) != attempt:
                continue
            early = self._early.setdefault(key, {})
            early[number] = (kind, value)
            # Deliver in the order the job sent them.
            while self._sent.get(key, 0) in early:
                kind, value = early.pop(self._sent.get(key, 0))
                if not self._deliver(key, kind, value):
                    break
            if not early:
                self._early.pop(key, None)
        self._poll_inbox()

    def _deliver(self, key: int, kind: str, value: Any) -> bool:
        """Report one message of a running (or just ended) job; False if the job
        is gone."""
        slot = self._where.get(key)
        held = self._held.get(key)
        node = slot.node if slot is not None else held[0] if held else None
        if node is None:
            return False
        self._sent[key] = self._sent.get(key, 0) + 1
        if kind == "provisional":
            self._events.job_provisional(key, node.info or self._view_node(node), value)
        elif kind == "file":
            self._save_file(key, *value)
        if held is not None and self._sent[key] >= held[2]:
            self._release(key)
        return True

    def _view_node(self, node: _Node) -> NodeInfo:
        return NodeInfo(node.ray_id, node.host, node.port, "", len(node.slots))

    def _save_file(self, key: int, path: str, data: bytes) -> None:
        base_dir = self._files_dir or os.getcwd()
        try:
            saved = write_inside(base_dir, path, memoryview(data))
        except (DispynbError, OSError) as exc:
            logger.warning("file %r from job %d not saved: %s", path, key, exc)
            return
        logger.info("saved %s from job %d", saved, key)

    # -- closing --

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
        ray = self._ray
        cleanups = {}
        for slot in idle:
            try:
                cleanups[slot.handle.cleanup.remote()] = slot
            except Exception as exc:
                logger.warning("cleanup not started on a Ray actor: %s", exc)
        if cleanups:
            done, pending = ray.wait(
                list(cleanups), num_returns=len(cleanups), timeout=CLOSE_WAIT
            )
            for ref in done:
                try:
                    error = ray.get(ref)
                except Exception as exc:
                    error = _reason(exc)
                if error:
                    logger.warning("cleanup failed on a Ray worker: %s", error)
            if pending:
                logger.warning(
                    "cleanup did not finish within %s s on %d Ray workers",
                    CLOSE_WAIT,
                    len(pending),
                )
        for handle in [*(slot.handle for slot in self._slots), self._inbox]:
            if handle is None:
                continue
            try:
                ray.kill(handle, no_restart=True)
            except Exception as exc:
                logger.debug("Ray actor already gone: %s", exc)

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
        now = time.time()
        idle = []
        for slot in self._slots:
            if slot.dead:
                continue
            for index, (key, _, _) in enumerate(slot.inflight):
                self._forget(key)
                if index == 0:
                    self._events.job_done(
                        key,
                        slot.node.info,
                        Outcome(
                            JobStatus.Terminated,
                            exception="job terminated: the cluster was closed\n",
                            start_time=now,
                            end_time=now,
                        ),
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
        self._where.clear()
        self._closed = True
        for node in self._nodes.values():
            if node.info is not None and not node.closed:
                node.closed = True
                self._events.node_closed(
                    node.info, "cluster closed", Departure.RELEASED
                )
        return idle


def _check_picklable(value: Any, what: str) -> None:
    """Raise `SerializationError` naming ``what`` if ``value`` does not pickle."""
    kind = type(value)
    if kind in _PLAIN:
        return
    if (kind is tuple or kind is list) and all(type(v) in _PLAIN for v in value):
        return
    try:
        serialize.dumps(value)
    except SerializationError as exc:
        raise SerializationError(
            f"{what} of the job cannot be sent to Ray: {exc}"
        ) from exc


def _reason(exc: BaseException) -> str:
    """A one-paragraph reason from a Ray error (its first lines)."""
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    if len(lines) > 12:
        text = "\n".join([*lines[:12], "..."])
    return text


__all__ = ["RayBackend", "RayEngine"]
