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
  there (addresses, hosts or worker names, or wildcards of them: ``'10.0.0.*'``),
  with Dask's ``workers=`` restrictions;
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
  The client answers with ``Client.run`` on that worker
  (`_daskworker.answer_file`), which hands the answer to the job's runner: the
  call returns 0 once the client wrote the file, -1 if it did not.
* **provisional results** and the **start** of jobs running longer than
  `_daskworker.START_REPORT` are Dask structured events: the worker calls
  ``Worker.log_event`` on this client's topic (its id), the client listens with
  ``Client.subscribe_topic``; the scheduler plugin `_daskfence.Fence` keeps the
  scheduler from storing them (it keeps a topic's last 1000 events otherwise).
* **lost workers**: the scheduler's ``remove-worker`` event (topic ``"all"``) says
  which tasks were running there. Reentrant jobs are requeued (Dask reschedules them)
  up to ``max_attempts``; the others are abandoned, as dispy does with a lost node's
  jobs. The scheduler plugin `_daskfence.Fence` cancels them on the scheduler in the
  same loop turn, so they never run twice.
* **job_timeout** is enforced by the task thread (it kills the runner) and
  **mem_limit** by ``RLIMIT_AS`` in the runner.
* **fresh_process** (the Executor's ``max_tasks_per_child``): a runner runs one
  job, then it is killed and another forked after setup.

dispy features Dask cannot give (node management, recovery, per-job depends) raise
`NotSupportedError` when asked for.
dispynb must be installed on the Dask workers (it runs the jobs there); the scheduler
needs nothing of dispynb.
"""

from __future__ import annotations

import contextlib
from typing import Any

from dispynb.backends._daskjobs import _Jobs
from dispynb.backends._dasknodes import _Nodes
from dispynb.backends._daskselect import _wanted_workers as _wanted_workers
from dispynb.backends._daskstate import CLOSE_TIMEOUT as CLOSE_TIMEOUT
from dispynb.backends._daskstate import CONNECT_TIMEOUT as CONNECT_TIMEOUT
from dispynb.backends._daskstate import MAX_SENT_FILE as MAX_SENT_FILE
from dispynb.backends._daskstate import SETUP_WAIT as SETUP_WAIT
from dispynb.backends.base import (
    FRESH_PROCESS,
    JOB_LIMITS,
    NODE_JOBS,
    PROGRAM,
    RESULT_TYPES,
    SELECT_NODES,
    SEND_FILE,
    SETUP,
    SUBMIT_NODE,
    TRAFFIC,
    ClusterConfig,
    EngineManagedNodes,
    JobEvents,
)
from dispynb.errors import ConfigurationError

_MISSING_DASK = (
    "the Dask engine needs dask.distributed: pip install 'dask[distributed]' (or "
    "'.[dask]' in dispynb's checkout), and dispynb on the Dask workers too"
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
        {
            SETUP,
            SUBMIT_NODE,
            JOB_LIMITS,
            NODE_JOBS,
            PROGRAM,
            SELECT_NODES,
            SEND_FILE,
            TRAFFIC,
            RESULT_TYPES,
            FRESH_PROCESS,
        }
    )
    #: What to do instead of what Dask cannot give (`base.require`).
    instead = {
        "put": (
            "Dask's own client.scatter(obj, broadcast=True) does not reach "
            "dispynb's jobs either (a job given its Future gets the Future, not the "
            "object). To send a large object to each worker once, have setup load "
            "it (from a file in depends=[...], or from storage the workers share) "
            "into a global the jobs read; or pass it as a job's argument (it "
            "travels with every job); or use dispynb's own node servers "
            "(engine=None), where put sends it once per node"
        )
    }

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


class DaskBackend(_Nodes, _Jobs, EngineManagedNodes):
    """One cluster's computation on a Dask cluster (from `DaskEngine.open`).

    Its state lives on the façade's loop, where its asynchronous Dask client runs
    too: Dask calls it back there, so events need no hand-over.

    Its parts: `_dasknodes` (the workers), `_daskjobs` (the jobs); their shared
    state is `_daskstate._DaskState`.
    """

    engine_name = "dask"
    scale_hint = "Dask manages its workers (scale the Dask cluster instead)"


__all__ = ["DaskBackend", "DaskEngine"]
