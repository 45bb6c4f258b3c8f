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
* **Jobs** are calls of the actor's ``run`` method, at least two in flight per
  actor (Ray runs an actor's calls in order, so the first is the running job and
  the next ones wait on the worker, which hides the round trip); for short jobs as
  many as make about 20 ms of work (up to 32), as the recent jobs' run times say.
  Arguments and results travel with Ray's own serialization, each argument of the
  job an argument of the call (Ray puts a large one in its object store on its own,
  as for its own tasks: no copy pickled by dispynb).
* **Batches.** Jobs that recently ran for less than 2 ms and have small arguments
  of plain types (numbers, short strings/bytes) and no ``job_timeout`` go several
  per Ray call (``run_batch``): Ray's cost per call, which dominates such jobs, is
  shared. Each job keeps its own outcome, stdout/stderr, start and end times; its
  ``Running`` status arrives with its outcome. A cancelled job of a batch is
  skipped there if its turn has not come (the others run, waiting or running);
  one that has begun gets a moment to end (its batch holds milliseconds of work),
  then its actor is killed (then the batch's other jobs count as the running job
  of a lost worker: run again if ``reentrant``, else ``Abandoned``).
* **Stop / cancel.** A job waiting here is dropped; one waiting on an actor is
  skipped there: ``JobActor.skip`` (in the actor's ``control`` concurrency group,
  which runs beside the job) records it, and its call returns without running it
  when its turn comes (``ray.cancel`` does not drop a call queued on a busy actor:
  Ray 2.60 runs it, then discards its result). It ends ``Cancelled`` as soon as the
  actor confirms; one that had begun is stopped as a running job (so is one whose
  skip got no answer, a Ray error other than a lost actor). Jobs taken back
  for an idle actor are skipped the same way: when nothing waits here, an idle
  actor takes the last call waiting on the busiest actor, or the jobs after the
  first of its running batch (for short jobs, once that call has run 0.1 s; no
  more short jobs are queued behind such a call). Ray cannot interrupt a running actor
  task, so the running job's actor is killed with
  ``ray.kill(actor, no_restart=False)``: the job ends ``Terminated`` and Ray
  restarts the actor (``max_restarts=-1``), which runs ``setup`` again. (The jobs
  run in the actor's thread for its default group, not its main thread.)
* **Worker death.** When an actor dies (its process killed, its node lost), its
  calls fail with ``RayActorError``; jobs that had not started are simply queued
  again. Ray restarts the actor on its node, and its next life tells the client
  how the last one ended (`_rayworker.earlier_lives`: faulthandler's report of a
  fatal signal, in a file of the actor's directory): the running job then ends
  ``Terminated`` as on dispynb's nodes ("the job's worker process was killed by
  SIGSEGV (11)"), not run again. If no life says so within 30 s (its node is
  lost), the job is run again elsewhere if the cluster is ``reentrant``,
  otherwise it ends ``Abandoned`` as dispy's jobs of a lost node do. A node whose
  actors all died for good (its node is gone) is closed.
* **Provisional results and files from jobs** go through an asynchronous actor of
  the engine (`_rayinboxactor.Inbox`, shared by the engine's clusters: a cluster that
  opens needs no worker process for it) that each cluster long-polls for its own;
  each job's outcome says how many it sent, so they all reach the job before its
  final result. The client answers each file there (`Inbox.answer`), where the
  job's ``dispy_send_file`` waits for it (`Inbox.wait_answer`, in a concurrency
  group of its own): 0 once the client wrote the file, -1 if it did not.
* **stdout/stderr** of a job are captured in the actor for that job (as on
  dispynb's own nodes) and come back with its outcome.

* **submit_node** jobs wait in a queue of their Ray node and go only to its actors
  (which are pinned there); they are abandoned if that node leaves.
* **Nodes that join** the Ray cluster after the `JobCluster` opened are found by
  asking ``ray.nodes()`` every 2 seconds: they get their actors (hence the
  computation's setup) and then jobs, like the nodes present at the start.
* **job_timeout / mem_limit** (and ``dispy_job_timeout`` / ``dispy_job_mem_limit``):
  the client kills the actor of a job that runs too long (it ends ``Terminated``);
  the actor lowers its ``RLIMIT_AS`` for the job's run.

Not available on Ray (`NotSupportedError` from ``JobCluster``): program files,
``nodes=`` (Ray's own nodes run the jobs), node management, ``send_file``,
``dispy_job_depends``, ``recover_file``. ``ray`` is imported only when a cluster opens
(dispynb's ``ray`` extra); the Ray workers need dispynb installed too.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import uuid
from typing import Any

from dispynb.backends import _probe, base
from dispynb.backends._rayactors import _Actors
from dispynb.backends._raycancels import _Cancels
from dispynb.backends._raydeaths import _Deaths
from dispynb.backends._rayinbox import _InboxReader
from dispynb.backends._rayjobs import _Jobs
from dispynb.backends._raynotes import route_worker_deaths
from dispynb.backends.base import ClusterConfig, EngineManagedNodes, JobEvents
from dispynb.errors import ConfigurationError, NotSupportedError, TransportError

logger = logging.getLogger("dispynb.backends.ray")


def _ray() -> Any:
    """The ``ray`` module, or a `ConfigurationError` saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigurationError(
            f"the Ray engine needs the ray package ({exc}): pip install ray, the Ray "
            "cluster's version (or '.[ray]' in dispynb's checkout)"
        ) from exc


#: Seconds to open a TCP connection to the Ray head, and for it to answer as a gRPC
#: server does, before ``ray.init``.
CONNECT_TIMEOUT = 10.0


def _check_head(address: str | None) -> None:
    """Check that a Ray head (a gRPC server) answers at ``address`` (``"host:port"``
    or ``"ray://host:port"``; others are left to Ray) before ``ray.init``, which
    retries for many minutes (20 attempts of about 40 s each) both an address where
    nothing listens and one where another server does (a dashboard's port).

    Raises `OSError` if no connection opens, `TransportError` saying what answered
    if it is not a gRPC server."""
    if address is None or address == "auto" or "://" in address.removeprefix("ray://"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("0", "false", ""):
        # The head speaks TLS first: connecting is all this can check.
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT):
            return
    answer = _probe.probe(host.strip("[]"), int(port), CONNECT_TIMEOUT)
    if not answer.http2:
        raise TransportError(
            f"no Ray head answered at {address}: something listens there but it is "
            f"not Ray: {answer.found}. Give the address of the head's GCS (port "
            "6379 by default, `ray start --head --port=PORT`) or Ray Client's "
            "ray://HOST:10001; 8265 is Ray's dashboard"
        )


#: The connection to Ray that a `RayEngine` made in this process, if any: the
#: address it was given and the GCS address Ray then reported (at most one entry).
_made: list[tuple[str | None, str]] = []


def _gcs_address(ray: Any) -> str:
    """``HOST:PORT`` of the GCS this process's Ray connection reaches ("" if Ray
    does not say, as through Ray Client)."""
    try:
        return str(ray.get_runtime_context().gcs_address or "")
    except Exception:  # Ray Client's context has none
        return ""


def _same_gcs(address: str, gcs: str) -> bool:
    """Whether ``address`` (``HOST:PORT``) names the GCS at ``gcs`` (``IP:PORT``)."""
    host, _, port = address.rpartition(":")
    gcs_host, _, gcs_port = gcs.rpartition(":")
    if not host or port != gcs_port:
        return False
    try:
        found = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return False
    return gcs_host.strip("[]") in {str(info[4][0]) for info in found}


def _refuse_another_cluster(ray: Any, address: str | None) -> None:
    """Raise `ConfigurationError` when this process is connected to Ray through a
    `RayEngine` given another cluster's address than ``address``: Ray keeps one
    connection per process, so the jobs would run on that other cluster (as
    ``%dispy ray B`` after ``%dispy ray A`` did, checking A in B's name). A
    connection the program made itself (``ray.init``) is used as documented."""
    if not _made or address in (None, "auto") or address.startswith("ray://"):
        return
    given, gcs = _made[-1]
    if address == given or not gcs or _gcs_address(ray) != gcs:
        return  # the same address, or a connection dispynb did not make
    if _same_gcs(address, gcs):
        return
    where = given or f"{gcs} (a local Ray that RayEngine() started)"
    raise ConfigurationError(
        f"this process is connected to the Ray cluster at {where}, and Ray keeps "
        f"one connection per process: RayEngine({address!r}) would run its jobs "
        "there. To use another Ray cluster, close the clusters of the first and "
        "disconnect from it first (%dispy close in a notebook, or the first "
        "engine's close(), or ray.shutdown())"
    )


class RayEngine:
    """Run a `JobCluster`'s jobs on a Ray cluster.

    Parameters
    ----------
    address:
        What ``ray.init(address=...)`` takes: ``'HOST:PORT'`` of the cluster's head
        (its GCS), ``'ray://HOST:10001'`` (Ray Client), ``'auto'``; None starts a
        local Ray in this process. If this process is already connected to Ray
        (``ray.init`` was called), that connection is used and ``address`` is
        ignored; but a connection that another `RayEngine` made to another
        address is a `ConfigurationError` (Ray keeps one connection per process:
        close that engine first).
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
    # Not RESULT_TYPES: a job runs in its actor's process, which sends the result
    # back, and Ray unpickles what an actor returns as it likes.
    features: frozenset[str] = frozenset(
        {base.SETUP, base.JOB_LIMITS, base.SUBMIT_NODE, base.NODE_JOBS}
    )
    #: What to do instead of what Ray cannot give (`base.require`).
    instead = {
        "put": (
            "use Ray's own ref = ray.put(obj) and submit the job with ref as an "
            "argument (submit(ref, ...)): Ray gives the job the object, stored "
            "once in its object store; or use dispynb's own node servers "
            "(engine=None), where put sends it once per node"
        )
    }

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
        self._lock = threading.Lock()
        #: The clusters' shared inbox and the Ray job (connection) it belongs to.
        self._inbox: Any = None
        self._inbox_name = ""
        self._inbox_job: Any = None

    def connect(self) -> Any:
        """Connect this process to the Ray cluster (once); the ``ray`` module."""
        ray = _ray()
        if ray.is_initialized():
            _refuse_another_cluster(ray, self.address)
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
            _check_head(self.address)
            ray.init(address=self.address, **options)
            self._connected = True
            # Its deaths of dispynb's workers are told by the jobs, not printed.
            route_worker_deaths()
            _made[:] = [(self.address, _gcs_address(ray))]
        except (OSError, RuntimeError, ValueError) as exc:
            where = self.address or "a local Ray"
            raise TransportError(
                f"cannot connect to the Ray cluster at {where}: {exc} (is "
                "`ray start --head` running there, with the same Ray version? with "
                "token authentication, set RAY_AUTH_MODE=token and the cluster's "
                "token here too)"
            ) from exc
        return ray

    def inbox(self, ray: Any) -> tuple[Any, str]:
        """The `_rayinboxactor.Inbox` actor of this engine's clusters (made by the first
        cluster of each Ray connection) and its name: a cluster that opens needs no
        worker process of its own for it, and the actor holds no CPU (``num_cpus=0``).
        It lives until `close` or the end of this process's Ray connection. The
        clusters' actors find it by its name."""
        from dispynb.backends import _rayinboxactor

        context = ray.get_runtime_context()
        job = context.get_job_id()
        with self._lock:
            if self._inbox is None or self._inbox_job != job:
                strategy = importlib.import_module("ray.util.scheduling_strategies")
                # On this process's node if it is one (a lost worker node loses
                # no message).
                here = context.get_node_id()
                self._inbox_name = f"dispynb-inbox-{uuid.uuid4().hex}"
                self._inbox = (
                    # Jobs waiting for their files' answers: as many as CPUs,
                    # without holding the calls that carry messages.
                    ray.remote(concurrency_groups={_rayinboxactor.ANSWERS: 100_000})(
                        _rayinboxactor.Inbox
                    )
                    .options(
                        name=self._inbox_name,
                        num_cpus=0,
                        max_concurrency=64,
                        scheduling_strategy=strategy.NodeAffinitySchedulingStrategy(
                            here, soft=True
                        ),
                    )
                    .remote()
                )
                self._inbox_job = job
            return self._inbox, self._inbox_name

    def close(self) -> None:
        """Disconnect this process from Ray if this engine connected it (``%dispy
        close`` does); clusters still open on it stop working."""
        with self._lock:
            inbox, self._inbox, self._inbox_job = self._inbox, None, None
        if inbox is not None:
            ray = _ray()
            if ray.is_initialized():
                try:
                    ray.kill(inbox, no_restart=True)
                except Exception as exc:  # its Ray connection ended already
                    logger.debug("the Ray inbox is gone: %s", exc)
        if self._connected:
            self._connected = False
            _made.clear()
            _ray().shutdown()

    def open(self, events: JobEvents, config: ClusterConfig) -> RayBackend:
        """Set the computation up on the Ray cluster; return once a worker is ready."""
        if not callable(config.options.computation):
            raise NotSupportedError(
                "a program file is not supported on the 'ray' engine: give a Python "
                "function (it may run the program with subprocess)"
            )
        refuse_nodes(config.options.nodes)
        ray = self.connect()
        return base.started(RayBackend(ray, self, events, config))

    def __repr__(self) -> str:
        return f"RayEngine({self.address!r})"


def refuse_nodes(nodes: Any) -> None:
    """Raise `NotSupportedError` for ``JobCluster(nodes=...)``: Ray places the jobs
    on every node of its cluster, so a node list would be ignored."""
    if nodes is None:
        return
    raise NotSupportedError(
        f"nodes={nodes!r} is not supported on the 'ray' engine: Ray's nodes run the "
        "jobs (every node of the Ray cluster with a CPU gets the computation). Leave "
        "nodes= out; to run a job on one node use cluster.submit_node(node, ...); to "
        "use fewer CPUs per node, RayEngine(address, cpus=N); to use only some "
        "machines, start a Ray cluster of those (ray start --address=...)"
    )


class RayBackend(_Actors, _Jobs, _Cancels, _Deaths, _InboxReader, EngineManagedNodes):
    """One `JobCluster`'s computation on a Ray cluster (from `RayEngine.open`).

    All state lives on the façade's I/O loop: Ray's completion callbacks (on Ray's
    threads) and `submit`/`cancel` (any thread) hand over to it. Its parts:
    `_rayactors` (actors and nodes), `_rayjobs` (jobs), `_raycancels` (cancels),
    `_raydeaths` (jobs whose actor died), `_rayinbox` (provisional results and
    files); their shared state is `_raystate._RayState`.
    """

    engine_name = "ray"
    scale_hint = (
        "Ray manages its nodes (add one with `ray start --address=...`: it gets "
        "the computation and jobs)"
    )


__all__ = ["RayBackend", "RayEngine"]
