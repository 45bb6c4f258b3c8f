"""The Dask engine: a `JobCluster`'s jobs on an existing ``dask.distributed`` cluster.

``JobCluster(compute, engine=DaskEngine("tcp://scheduler:8786"))`` (or
``DaskEngine(client)``, ``DaskEngine(local_cluster)``) runs dispy's programs unchanged
on Dask's scheduler and workers. How each dispy feature maps onto Dask:

* **jobs** are Dask tasks (`_daskworker.run_job`, key ``dispynb-<cluster>-<n|r><key>``,
  ``pure=False``); their arguments are pickled once by the client, and results come
  back with batched ``Client.gather`` calls.
* **setup / cleanup and depends** run per worker in a Dask ``WorkerPlugin``
  (`_daskworker.ComputationPlugin`) registered for the cluster's lifetime; it starts
  a host process that runs ``setup`` and forks the job runners (dispynb's node model),
  and its ``teardown`` runs ``cleanup``.
* **Stop** is ``Client.cancel``: queued tasks are dropped by the scheduler; on the
  worker the plugin's ``transition`` hook sees the running task released and kills its
  runner process (a Dask task thread cannot be interrupted), then forks a fresh one.
* **stdout / stderr** are captured per job in the runner and returned with the result.
* **nodes=** (and ``%%dispy --on``) restricts the jobs to the Dask workers named
  there (addresses, hosts or worker names), with Dask's ``workers=`` restrictions;
  ``submit_node`` restricts one job to one worker the same way.
* **program computations** (``JobCluster('prog.sh')``): the program is written to
  the computation's directory on each worker and run once per job as a subprocess
  of the job's runner, as on dispynb's nodes (result: the exit code; stdout and
  stderr: its output, as bytes).
* **send_file** (the client's): ``Client.run`` on that worker writes the file into
  the computation's directory there (at most `MAX_SENT_FILE`).
* **dispy_send_file** in a job: the file's bytes (at most `MAX_SENT_FILE`) travel as a
  structured event on this client's topic, before the job's result, and are saved
  under ``files_dir`` (the working directory by default), as dispynb's nodes do.
* **provisional results** and the **start** of jobs running longer than
  `_daskworker.START_REPORT` are Dask structured events: the worker calls
  ``Worker.log_event`` on this client's topic (its id, so the scheduler drops them
  when the client leaves), the client listens with ``Client.subscribe_topic``.
* **lost workers**: the scheduler's ``remove-worker`` event (topic ``"all"``) says
  which tasks were running there. Reentrant jobs are requeued (Dask reschedules them)
  up to ``max_attempts``; the others are abandoned, as dispy does with a lost node's
  jobs. The scheduler plugin `_daskfence.Fence` cancels them on the scheduler in the
  same loop turn, so they never run twice.
* **job_timeout** is enforced by the task thread (it kills the runner) and
  **mem_limit** by ``RLIMIT_AS`` in the runner.

dispy features Dask cannot give (node management, recovery, per-job depends) raise
`NotSupportedError` when asked for.
dispynb must be installed on the Dask workers (it runs the jobs there); the scheduler
needs nothing of dispynb.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from dispynb.backends.base import (
    JOB_LIMITS,
    NODE_JOBS,
    PROGRAM,
    SELECT_NODES,
    SEND_FILE,
    SETUP,
    SUBMIT_NODE,
    ClusterConfig,
    Departure,
    EngineManagedNodes,
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
from dispynb.node import NodeAllocate
from dispynb.programs import read_program
from dispynb.protocol import serialize
from dispynb.protocol.files import write_inside

if TYPE_CHECKING:
    from dispynb.depends import FileRef

logger = logging.getLogger(__name__)

#: Seconds to connect to the scheduler.
CONNECT_TIMEOUT = 10.0

#: Seconds `open` waits for the workers present to report their setup (a longer
#: setup goes on; jobs wait for it on that worker).
SETUP_WAIT = 15.0

#: Seconds `close` may take (cleanup on the workers, then the client).
CLOSE_TIMEOUT = 60.0

#: Largest file a job may send back with ``dispy_send_file`` on Dask (bytes): it
#: travels through the Dask scheduler, which keeps the client's events until the
#: client leaves.
MAX_SENT_FILE = 32 << 20

_MISSING_DASK = (
    "the Dask engine needs dask.distributed: pip install 'dispynb[dask]' "
    "(and install dispynb on the Dask workers too)"
)


class DaskEngine:
    """Run a `JobCluster`'s jobs on an existing Dask distributed cluster.

    Parameters
    ----------
    cluster:
        The scheduler's address (``"tcp://host:8786"``), a ``distributed.Client``
        (its scheduler and security are used; dispynb opens its own client next to
        it), or a Dask cluster object (``LocalCluster``...) with a
        ``scheduler_address``.
    security:
        A ``distributed.Security`` for TLS, when ``cluster`` is an address.

    Examples
    --------
    >>> from dispynb import JobCluster  # doctest: +SKIP
    >>> from dispynb.backends.dask import DaskEngine
    >>> with JobCluster(compute, engine=DaskEngine("tcp://10.0.0.1:8786")) as c:
    ...     jobs = [c.submit(n) for n in range(10)]
    """

    name = "dask"
    features = frozenset(
        {SETUP, SUBMIT_NODE, JOB_LIMITS, NODE_JOBS, PROGRAM, SELECT_NODES, SEND_FILE}
    )

    def __init__(self, cluster: Any, *, security: Any = None) -> None:
        self._owned: Any = None  # a LocalCluster that close() stops
        if isinstance(cluster, str):
            if "://" not in cluster:
                cluster = f"tcp://{cluster}"
            self.address: str = cluster
            self.security = security
        elif hasattr(cluster, "scheduler_address") and not hasattr(cluster, "submit"):
            self.address = str(cluster.scheduler_address)
            self.security = security or getattr(cluster, "security", None)
        elif hasattr(cluster, "scheduler") and hasattr(cluster, "submit"):
            self.address = str(cluster.scheduler.address)
            self.security = security or getattr(cluster, "security", None)
        else:
            raise ConfigurationError(
                f"DaskEngine needs a scheduler address ('tcp://host:8786'), a "
                f"distributed.Client or a Dask cluster, not {type(cluster).__name__}"
            )

    def open(self, events: JobEvents, config: ClusterConfig) -> DaskBackend:
        """Set the computation up on the Dask workers; return its backend."""
        try:
            import distributed  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(_MISSING_DASK) from exc
        backend = DaskBackend(self, events, config)
        try:
            config.runner.run_sync(backend.start)
        except BaseException:
            with contextlib.suppress(Exception):
                config.runner.run_sync(backend.shutdown, timeout=CLOSE_TIMEOUT)
            raise
        return backend

    @classmethod
    def local(cls, workers: int, threads: int = 1) -> DaskEngine:
        """An engine on a new Dask cluster on this machine (127.0.0.1, ``workers``
        worker processes of ``threads`` threads named ``local-N``, no dashboard:
        ``LocalCluster(engine="dask")``) that `close` stops."""
        from dispynb.backends._dasklocal import DaskLocalCluster

        local = DaskLocalCluster(nodes=workers, cpus=threads)
        engine = local.engine
        engine._owned = local
        return engine

    def close(self) -> None:
        """Stop the Dask cluster this engine started (`local`); else nothing."""
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()

    def __repr__(self) -> str:
        return f"DaskEngine({self.address!r})"


class DaskBackend(EngineManagedNodes):
    """One cluster's computation on a Dask cluster (from `DaskEngine.open`).

    Its state lives on the façade's loop, where its asynchronous Dask client runs
    too: Dask calls it back there, so events need no hand-over.
    """

    engine_name = "dask"
    scale_hint = "Dask manages its workers (scale the Dask cluster instead)"

    def __init__(self, engine: DaskEngine, events: JobEvents, config: ClusterConfig):
        opts = config.options
        self.engine = engine
        self.events = events
        self.config = config
        self.runner = config.runner
        self.uid = secrets.token_hex(6)
        self.reentrant = bool(opts.reentrant)
        self.max_attempts = int(opts.max_attempts) if self.reentrant else 1
        self.prefix = f"dispynb-{self.uid}-"
        self.plugin_name = f"dispynb-{self.uid}"
        self.fence_name = f"dispynb-fence-{self.uid}"
        self.client: Any = None
        self.workers: dict[str, NodeInfo] = {}
        self.failed: dict[str, str] = {}
        self.unwanted: set[str] = set()  # set up, but not among nodes=
        self.futures: dict[int, Any] = {}
        self.started: dict[int, tuple[NodeInfo, float]] = {}
        self.running: defaultdict[str, set[int]] = defaultdict(set)
        self.lost: dict[int, int] = {}
        self.attempts = itertools.count(1)
        self.finished: list[tuple[int, Any]] = []
        self.gathering = False
        self.cancelling: list[Any] = []
        self.closed = False
        self.wanted = _wanted_workers(opts.nodes)
        self.files_dir = opts.files_dir
        self.result_types = (
            None
            if opts.result_types is None
            else serialize.AllowList(opts.result_types)
        )
        self._ready_seen: asyncio.Event | None = None

    # -- start-up (on the loop) ------------------------------------------------------

    async def start(self) -> None:
        import distributed

        from dispynb.backends import _daskfence
        from dispynb.backends._daskworker import ComputationPlugin

        self._ready_seen = asyncio.Event()
        try:
            make_client: Any = distributed.Client  # untyped constructor
            self.client = await make_client(
                self.engine.address,
                asynchronous=True,
                security=self.engine.security,
                set_as_default=False,
                timeout=CONNECT_TIMEOUT,
                name=f"dispynb-{self.config.name}",
            )
        except (OSError, TimeoutError) as exc:
            raise TransportError(
                f"cannot connect to the Dask scheduler at {self.engine.address}: {exc}"
            ) from exc
        self.client.subscribe_topic(self.client.id, self._on_event)
        self.client.subscribe_topic("all", self._on_scheduler_event)
        import cloudpickle

        # the scheduler needs no dispynb: the fence travels by value
        cloudpickle.register_pickle_by_value(_daskfence)
        fence = _daskfence.Fence(self.prefix, self.max_attempts, self.client.id)
        await self.client.register_plugin(fence, name=self.fence_name)
        opts = self.config.options
        program = (
            read_program(opts.computation)
            if isinstance(opts.computation, str)
            else None
        )
        bundle = {
            "func": None if program else opts.computation,
            "program": program,
            "setup": opts.setup,
            "cleanup": opts.cleanup if callable(opts.cleanup) else None,
            "setup_args": (),
            "names": dict(self.config.depends.names),
        }
        files = [(ref.relative, ref.read()) for ref in self.config.depends.files]
        max_output = opts.max_output_size
        plugin = ComputationPlugin(
            self.uid,
            self.client.id,
            [_as_bytes(b) for b in serialize.dumps(bundle)],
            files,
            opts.dest_path,
            max_output if isinstance(max_output, int) else None,
            MAX_SENT_FILE,
        )
        try:
            responses = await self.client.register_plugin(plugin, name=self.plugin_name)
        except (ImportError, AttributeError) as exc:
            raise SetupError(
                f"the Dask workers cannot load dispynb ({exc}): install dispynb on "
                "them (pip install dispynb) with the same version as here"
            ) from exc
        await self._check_wanted()
        await self._await_setup(set(responses))

    async def _check_wanted(self) -> None:
        """Raise `ConfigurationError` if ``nodes=`` names no worker of the cluster
        (Dask would keep the jobs waiting for one for ever)."""
        if self.wanted is None:
            return
        info = await self.client.scheduler.identity()
        workers = {a: str(w.get("name", "")) for a, w in info["workers"].items()}
        if not any(self._is_wanted(a, n) for a, n in workers.items()):
            listing = ", ".join(f"{n} ({a})" for a, n in sorted(workers.items()))
            raise ConfigurationError(
                f"nodes={self.wanted}: no worker of the Dask cluster at "
                f"{self.engine.address} matches (give worker addresses, hosts or "
                f"names); its workers are: {listing or 'none'}"
            )

    def _is_wanted(self, address: str, name: str) -> bool:
        """Whether ``nodes=`` lets jobs run on the worker at ``address``."""
        if self.wanted is None:
            return True
        host, port = _host_port(address)
        forms = {address, f"{host}:{port}", f"[{host}]:{port}", host, name}
        return any(item in forms for item in self.wanted)

    async def _await_setup(self, workers: set[str]) -> None:
        """Wait (bounded) for the setup reports of the workers present."""
        assert self._ready_seen is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.options.setup_timeout or SETUP_WAIT)
        while not workers <= (set(self.workers) | set(self.failed) | self.unwanted):
            self._ready_seen.clear()
            try:
                await asyncio.wait_for(self._ready_seen.wait(), deadline - loop.time())
            except TimeoutError:
                logger.info("Dask workers are still setting up; jobs will wait")
                return
        if self.failed and not self.workers:
            address, error = next(iter(self.failed.items()))
            message, _, remote = error.partition("\n")
            raise SetupError(
                f"setup failed on every Dask worker; on {address}: {message}", remote
            )

    # -- events from the workers and the scheduler (on the loop) ----------------------

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
                import pickle

                result = serialize.loads(pickle.loads(data), self.result_types)
            except DispynbError as exc:
                logger.warning("provisional result of job %d dropped: %s", key, exc)
                return
            node = self._node(address)
            if key not in self.started:
                self.started[key] = (node, event[0])
                self.events.job_running(key, node, event[0])
            self.events.job_provisional(key, node, result)
        elif kind == "file":
            _, dask_key, path, data = message
            key = self._key_of(dask_key)
            if key is not None:
                self._save_file(key, path, data)

    def _save_file(self, key: int, path: str, data: bytes) -> None:
        """A job sent a file (``dispy_send_file``): save it under ``files_dir``."""
        base_dir = self.files_dir or os.getcwd()
        try:
            saved = write_inside(base_dir, path, memoryview(data))
        except (DispynbError, OSError) as exc:
            logger.warning("file %r from job %d not saved: %s", path, key, exc)
            return
        logger.info("saved %s from job %d", saved, key)

    def _worker_ready(
        self, uid: str, address: str, nthreads: int, name: str, error: str
    ) -> None:
        if uid != self.uid or self.closed:
            return
        if not self._is_wanted(address, str(name)):
            self.unwanted.add(address)  # not among nodes=: set up, never used
            if self._ready_seen is not None:
                self._ready_seen.set()
            return
        if error:
            self.failed[address] = error
            logger.warning("setup failed on Dask worker %s: %s", address, error)
        else:
            host, port = _host_port(address)
            node = NodeInfo(address, host, port, name, int(nthreads))
            self.workers[address] = node
            self.events.node_ready(node)
        if self._ready_seen is not None:
            self._ready_seen.set()

    def _on_scheduler_event(self, event: tuple[float, Any]) -> None:
        message = event[1]
        if not isinstance(message, dict) or message.get("action") != "remove-worker":
            return
        address = message.get("worker", "")
        self.failed.pop(address, None)
        node = self.workers.pop(address, None) or self._node(address)
        for dask_key in message.get("processing-tasks") or ():
            key = self._key_of(dask_key)
            if key is None or key not in self.futures:
                continue
            self.started.pop(key, None)
            self.running[address].discard(key)
            count = self.lost[key] = self.lost.get(key, 0) + 1
            if count < self.max_attempts:
                self.events.job_requeued(key)  # Dask runs it again elsewhere
                continue
            self.futures.pop(key, None)  # the fence cancels it on the scheduler
            self.lost.pop(key, None)
            why = "not reentrant" if not self.reentrant else "max_attempts reached"
            reason = f"its Dask worker {address} was lost while it ran ({why})"
            self.events.job_abandoned(key, node, reason)
        self.running.pop(address, None)
        if address in self.workers or node.cpus or not self.closed:
            self.events.node_closed(node, "the Dask worker left", Departure.LOST)

    def _key_of(self, dask_key: Any) -> int | None:
        if not isinstance(dask_key, str) or not dask_key.startswith(self.prefix):
            return None
        try:
            return int(dask_key[len(self.prefix) + 1 :].partition("-")[0])
        except ValueError:
            return None

    def _node(self, address: str) -> NodeInfo:
        node = self.workers.get(address)
        if node is None:
            host, port = _host_port(address)
            node = NodeInfo(address, host, port, "", 0)
        return node

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
            raise SerializationError(_unpicklable(job, exc)) from exc

    def submit(self, job: JobRequest) -> None:
        """Queue a prepared job on Dask; never blocks."""
        if getattr(job, "payload", None) is None:
            self.prepare(job)
        limits = (job.timeout, job.mem_limit)
        args = (job.key, job.payload, job.node_id, limits)
        if self.runner.in_loop_thread():
            self._submit(*args)
        else:
            self.runner.call_soon(self._submit, *args)

    def _submit(
        self,
        key: int,
        buffers: list[bytes],
        node_id: str | None,
        limits: tuple[float | None, int | None],
    ) -> None:
        from dispynb.backends._daskworker import run_job

        if self.closed:
            self.events.job_cancelled(key)
            return
        kind = "r" if self.reentrant else "n"
        dask_key = f"{self.prefix}{kind}{key}-{next(self.attempts)}"
        workers: list[str] | None = [node_id] if node_id else self.wanted
        if not node_id and self.failed:
            workers = list(self.workers) or workers  # not where setup failed
        future = self.client.submit(
            run_job,
            self.plugin_name,
            limits,
            *buffers,
            key=dask_key,
            pure=False,
            workers=workers,
            allow_other_workers=False,
        )
        self.futures[key] = future
        task = asyncio.ensure_future(self._watch(key, future))
        task.add_done_callback(_log_failure)

    async def _watch(self, key: int, future: Any) -> None:
        await _settled(future)
        if key not in self.futures or self.futures[key] is not future:
            return  # cancelled or abandoned here already
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
        node = self._node(address)
        seen = self.started.pop(key, None)
        self.running[address].discard(key)
        self.lost.pop(key, None)
        if outcome == "setup":
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
                exception = f"the job's result cannot be loaded here: {exc}\n"
        self.events.job_done(
            key,
            node,
            Outcome(status, result, stdout, stderr, exception, start, end),
        )

    def _forget(self, key: int) -> None:
        seen = self.started.pop(key, None)
        if seen is not None:
            self.running[seen[0].node_id].discard(key)
        self.lost.pop(key, None)

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
            if seen is None:
                self.events.job_cancelled(key)
                continue
            node, start = seen
            self.running[node.node_id].discard(key)
            outcome = Outcome(
                JobStatus.Terminated,
                exception="terminated: cancelled while it ran",
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

    # -- nodes ----------------------------------------------------------------------

    def send_file(self, node_id: str, ref: FileRef) -> str:
        """Write a file into the computation's directory on one Dask worker
        (``Client.run`` there); '' or the error."""
        from dispynb.backends._daskworker import receive_file

        try:
            data = ref.read()
        except OSError as exc:
            return f"cannot read {ref.relative!r}: {exc}"
        if len(data) > MAX_SENT_FILE:
            return (
                f"{ref.relative!r} has {len(data)} bytes, over the {MAX_SENT_FILE} "
                "a file sent to a Dask worker may have: put it in depends, or on "
                "storage the workers share"
            )

        async def send() -> str:
            replies = await self.client.run(
                receive_file, self.plugin_name, ref.relative, data, workers=[node_id]
            )
            return str(replies.get(node_id, f"no Dask worker {node_id}"))

        try:
            return str(self.runner.run_sync(send))
        except Exception as exc:  # the worker left, the scheduler is gone
            return f"not sent to Dask worker {node_id}: {exc}"

    def running_jobs(self, node_id: str) -> list[int]:
        """Keys of the jobs known to run on a Dask worker (those running longer
        than `_daskworker.START_REPORT`)."""

        async def keys() -> list[int]:
            return sorted(self.running.get(node_id, ()))

        return self.runner.run_sync(keys)

    def node_load(self) -> dict[str, tuple[int, int]]:
        """``(cpus, jobs known to run there)`` of each Dask worker set up (Dask's
        scheduler keeps the queue, so no job waits on a worker here)."""

        async def load() -> dict[str, tuple[int, int]]:
            return {
                address: (node.cpus, len(self.running.get(address, ())))
                for address, node in self.workers.items()
            }

        return self.runner.run_sync(load)

    # -- shutdown -------------------------------------------------------------------

    def close(self, terminate: bool) -> None:
        """Cancel what is left (``terminate``), run cleanup on the workers (the
        plugin's teardown), remove the fence and close the Dask client."""
        try:
            self.runner.run_sync(self.shutdown, terminate, timeout=CLOSE_TIMEOUT)
        except (TimeoutError, DispynbError, OSError) as exc:
            logger.warning("closing the Dask computation: %s", exc)

    async def shutdown(self, terminate: bool = True) -> None:
        if self.closed:
            return
        if terminate and self.futures:
            self._cancel(list(self.futures))
            self._flush_cancels()
        self.closed = True
        client = self.client
        if client is None:
            return
        for name, unregister in (
            (self.plugin_name, client.unregister_worker_plugin),
            (self.fence_name, client.unregister_scheduler_plugin),
        ):
            with contextlib.suppress(Exception):
                await unregister(name)
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(client.id)
            client.unsubscribe_topic("all")
        with contextlib.suppress(Exception):
            await client.close()
        self.client = None


def _wanted_workers(nodes: Any) -> list[str] | None:
    """The workers ``JobCluster(nodes=...)`` names (None: every worker).

    A local cluster object (it brings its engine) or ``'*'`` means every worker;
    strings are worker addresses, ``host:port``, hosts or worker names; dispy's node
    objects count by their IP address.
    """
    if nodes is None or hasattr(nodes, "engine"):
        return None
    items = [nodes] if isinstance(nodes, str | NodeAllocate) else nodes
    try:
        wanted = [_worker_spec(item) for item in items]
    except (TypeError, AttributeError) as exc:
        raise ConfigurationError(
            f"nodes={nodes!r}: on the 'dask' engine give Dask worker addresses, "
            "hosts or worker names"
        ) from exc
    return None if not wanted or "*" in wanted else wanted


def _worker_spec(item: Any) -> str:
    """What one item of ``nodes=`` selects: an address, host or name.

    A `NodeAllocate` selects by host (and port, if given); its per-node ``cpus``,
    ``setup_args`` and ``depends`` have no meaning for Dask workers, so they are
    refused rather than ignored.
    """
    if isinstance(item, str):
        return item
    if isinstance(item, NodeAllocate):
        extras = [
            name
            for name, value in (
                ("cpus", item.cpus),
                ("setup_args", item.setup_args),
                ("depends", item.depends),
            )
            if value
        ]
        if extras:
            raise NotSupportedError(
                f"nodes=: NodeAllocate({item.host!r}) with {', '.join(extras)}: "
                "per-node settings are not supported on the 'dask' engine (a Dask "
                "worker's threads are its CPUs; every worker gets the cluster's "
                "setup and depends): give nodes= the workers' addresses, hosts or "
                "names only, and JobCluster(setup=..., depends=...) for all of them"
            )
        host = item.host if item.port is None else f"{item.host}:{item.port}"
        return str(host)
    return str(getattr(item, "ip_addr", None) or item.host)


def _as_bytes(buffer: Any) -> bytes:
    """A pickle buffer as bytes, without a copy when it is a whole bytes object."""
    if isinstance(buffer, bytes):
        return buffer
    view = memoryview(buffer)
    if isinstance(view.obj, bytes) and len(view.obj) == view.nbytes:
        return view.obj
    return view.tobytes()


def _host_port(address: str) -> tuple[str, int]:
    """``('10.0.0.2', 40123)`` for ``'tcp://10.0.0.2:40123'``."""
    location = address.rsplit("://", 1)[-1]
    host, _, port = location.rpartition(":")
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        return location, 0


def _unpicklable(job: JobRequest, error: SerializationError) -> str:
    """Name the argument that cannot be pickled."""
    named = [(f"argument {i + 1}", value) for i, value in enumerate(job.args)]
    named += [(f"keyword argument {k!r}", v) for k, v in job.kwargs.items()]
    for name, value in named:
        try:
            serialize.dumps(value)
        except SerializationError as exc:
            return f"job {name} cannot be sent to a Dask worker: {exc}"
    return f"job arguments cannot be sent to a Dask worker: {error}"


async def _settled(future: Any) -> None:
    """Wait until a Dask future is no longer pending, without fetching its result
    (what ``distributed.wait`` awaits; it needs a default client, we have none)."""
    await future._state.wait()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("Dask engine: %s", task.exception(), exc_info=task.exception())


__all__ = ["DaskBackend", "DaskEngine"]
