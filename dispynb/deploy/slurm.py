"""`SlurmNodes`: node servers submitted to SLURM as batch jobs.

Each node is one batch job (``sbatch``) of one task: the node server serves the CPUs
SLURM gave the job (``--cpus-per-task``) within its memory (``--mem``, enforced by
SLURM), until the walltime, `scale` or `close` (``scancel``) ends it. Partition,
account, walltime and any other ``#SBATCH`` directive are options; `job_script`
shows the script.

How the secret reaches the node without a command line or a world-readable file:
``sbatch`` reads the script on its standard input and gets the secret in its own
environment (``DISPYNB_LAUNCH_SECRET``), which SLURM keeps with the job as it keeps
every job's environment (``--export=ALL``, SLURM's default): in slurmctld's state
directory, readable by the SLURM user and root only, then in the memory of the
job's processes, whose environment only their own user and root can read. The
script holds no secret; it pipes the variable to the node's standard input
(``--secret-stdin``, ``printf`` being a shell built-in: no command line) after
removing it from the node's environment, so the node's jobs never see it. SLURM's
RPCs are signed with MUNGE but not encrypted: the environment crosses the cluster
network in clear, as every job's does. Where that is not acceptable, give
``secret_file=`` (a file of mode 600 in a shared home directory): the node then reads
``--secret-file`` and the secret never goes through SLURM.

The nodes register with this process (``--register``) at the local address that
routes to slurmctld (the compute nodes reach the login node through the cluster's
network), unless ``register_host`` says otherwise.

When SLURM ends a node's job (walltime, preemption, a failed compute node), SLURM
sends the node SIGTERM then SIGKILL (after ``KillWait``): the cluster loses the
node as any lost node, its reentrant jobs are resubmitted to the other nodes, and
`exited` says why (``TIMEOUT``...). Following the jobs' states is
`dispynb.deploy.slurmjobs`'; the batch script, `dispynb.deploy.slurmscript`'s.

A node whose client is gone ends its job by itself: each node runs with
``--exit-without-client`` (``exit_without_client=``, default 120 s). Once no client
has been connected to it for that long, the node registers with this process again;
when this process died without `close` (SIGKILL, a crashed kernel, a lost login
node), nobody answers and the node exits, instead of holding its allocation idle
until the walltime. A connected client keeps the node, busy or idle, and so does
this launcher while it is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping, Sequence

from dispynb.deploy.base import (
    REGISTER_WAIT,
    Launched,
    LaunchError,
    NodeLauncher,
    missing_module_hint,
    route_address,
)
from dispynb.deploy.registry import RegisteredNode
from dispynb.deploy.slurmjobs import COMMAND_TIMEOUT as COMMAND_TIMEOUT
from dispynb.deploy.slurmjobs import ENDED as ENDED
from dispynb.deploy.slurmjobs import POLL_INTERVAL as POLL_INTERVAL
from dispynb.deploy.slurmjobs import QUEUED, _JobStates
from dispynb.deploy.slurmjobs import SUSPENDED as SUSPENDED
from dispynb.deploy.slurmjobs import SlurmJob as SlurmJob
from dispynb.deploy.slurmscript import SECRET_VARIABLE as SECRET_VARIABLE
from dispynb.deploy.slurmscript import batch_script, sbatch_directives
from dispynb.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: Seconds `close` waits for SLURM to end the jobs it cancelled.
STOP_WAIT = 60.0
#: Default seconds a node waits without any client before it checks that its
#: launcher lives, and ends its job if not (``dispynb-node --exit-without-client``).
EXIT_WITHOUT_CLIENT = 120.0
#: Seconds `close` (and the cancel at interpreter exit) gives ``scancel``, and each
#: ``squeue`` that follows it. A controller that answers does so in well under a
#: second; one that is down makes SLURM's commands retry for about its
#: ``MessageTimeout`` (10 s by default; measured: 9 s each with slurmctld killed),
#: and an unreachable one would take `COMMAND_TIMEOUT`. The jobs left then end by
#: themselves (``--exit-without-client``).
CLOSE_TIMEOUT = 10.0


class SlurmNodes(_JobStates, NodeLauncher[SlurmJob]):
    """Node servers as SLURM batch jobs; use as ``JobCluster(nodes=...)``.

    Parameters
    ----------
    count:
        Nodes (batch jobs) to submit now; `scale` changes it later.
    cpus:
        CPUs per node (``--cpus-per-task``); default: SLURM's (often 1).
    memory:
        Memory per node (``--mem``: ``'4G'``, ``'500M'``, an int in MB); default:
        the partition's.
    walltime:
        Time limit per node (``--time``: ``'1:00:00'``, ``'2-0'``, an int in
        minutes); default: the partition's.
    partition, account:
        ``--partition`` and ``--account``.
    directives:
        More ``sbatch`` options, one per ``#SBATCH`` line (``['--gres=gpu:1',
        '--qos=short']``).
    python:
        The Python that runs ``-m nodeserver`` on the compute nodes (default: this
        one, as on a shared file system).
    node_args:
        More ``dispynb-node`` options.
    env:
        Environment variables for the nodes (given to ``sbatch`` in its
        environment, never on its command line).
    log_directory:
        Where the jobs' output goes (``dispynb-node-<jobid>.out``); default:
        SLURM's default, ``slurm-<jobid>.out`` in the current directory.
    exit_without_client:
        Seconds a node stays without any connected client before it checks that
        this launcher still lives (registering again) and, if not, exits and ends
        its job (``--exit-without-client``). Default 120; None: never (the node
        then runs until the walltime if this process dies without `close`).
    secret_file:
        A file of mode 600 holding the secret, readable at the same path on the
        compute nodes: the nodes read it (``--secret-file``) and the secret never
        goes through SLURM. Default: the secret goes in the job's environment.
    sbatch, squeue, scancel, scontrol:
        The SLURM commands.
    secret, register_host, register_port, wait:
        See `NodeLauncher`; by default nodes register with the local address that
        routes to slurmctld.

    Examples
    --------
    >>> with SlurmNodes(4, cpus=8, memory="16G", walltime="2:00:00") as nodes:
    ...     cluster = JobCluster(compute, nodes=nodes)  # doctest: +SKIP
    """

    def __init__(
        self,
        count: int = 1,
        *,
        cpus: int | None = None,
        memory: str | int | None = None,
        walltime: str | int | None = None,
        partition: str | None = None,
        account: str | None = None,
        directives: Sequence[str] = (),
        python: str = sys.executable,
        node_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_directory: str | None = None,
        exit_without_client: float | None = EXIT_WITHOUT_CLIENT,
        secret_file: str | os.PathLike[str] | None = None,
        sbatch: str = "sbatch",
        squeue: str = "squeue",
        scancel: str = "scancel",
        scontrol: str = "scontrol",
        secret: str | bytes | None = None,
        register_host: str | None = None,
        register_port: int = 0,
        wait: float = REGISTER_WAIT,
    ) -> None:
        if count < 0:
            raise ConfigurationError(f"count must be 0 or more, not {count}")
        if cpus is not None and cpus < 1:
            raise ConfigurationError(f"cpus must be at least 1, not {cpus}")
        if exit_without_client is not None and not exit_without_client > 0:
            raise ConfigurationError(
                f"exit_without_client must be a positive number of seconds or None "
                f"(never), not {exit_without_client!r}"
            )
        self.count = count
        self.exit_without_client = exit_without_client
        self._log_directory = (
            os.path.abspath(os.path.expanduser(log_directory))
            if log_directory
            else None
        )
        self.directives = sbatch_directives(
            cpus, memory, walltime, partition, account, log_directory, directives
        )
        self.cpus = cpus
        self.python = python
        self.node_args = [str(arg) for arg in node_args]
        for key, value in (env or {}).items():
            if not key.isidentifier() or "\0" in value:
                raise ConfigurationError(f"not an environment variable: {key!r}")
        self.env = dict(env or {})
        self.secret_file = os.fspath(secret_file) if secret_file else None
        self.commands = {
            "sbatch": sbatch,
            "squeue": squeue,
            "scancel": scancel,
            "scontrol": scontrol,
        }
        self._controller_route: str | None = None
        self._poller: asyncio.Task[None] | None = None
        # Jobs still to cancel if this launcher is dropped or the interpreter exits
        # without close() (a notebook kernel being shut down).
        self._live_ids: set[str] = set()
        #: The jobs `close` cancels, with one ``scancel`` (`_stop` while closing).
        self._closing_jobs: list[SlurmJob] = []
        super().__init__(
            secret=secret,
            register_host=register_host,
            register_port=register_port,
            wait=wait,
        )
        self._finalizer = weakref.finalize(
            self, _cancel_now, scancel, self._live_ids, dict(os.environ)
        )
        if count:
            try:
                self.start(count)
            except BaseException:
                self.close()
                raise

    @property
    def default_count(self) -> int:
        return 1

    @property
    def kind(self) -> str:
        return "slurm"

    @property
    def jobs(self) -> list[SlurmJob]:
        """The batch jobs submitted, in order."""
        with self._changed:
            return [x.handle for x in self._launched if x.handle is not None]

    # -- the job script --------------------------------------------------------------

    def job_script(
        self, name: str = "dispynb-node", register_to: str = "HOST:PORT"
    ) -> str:
        """The batch script of a node named ``name`` (it holds no secret)."""
        return batch_script(
            name,
            register_to,
            python=self.python,
            directives=self.directives,
            cpus=self.cpus,
            exit_without_client=self.exit_without_client,
            secret_file=self.secret_file,
            node_args=self.node_args,
        )

    # -- SLURM commands ----------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env.pop(SECRET_VARIABLE, None)
        return env

    async def _run(
        self,
        name: str,
        *args: str,
        stdin: bytes | None = None,
        secret: bool = False,
        timeout: float = COMMAND_TIMEOUT,
    ) -> tuple[int, str, str]:
        """Run a SLURM command; return its status, output and error output.

        Raises `LaunchError` if it did not end within ``timeout`` seconds (it is
        killed then, and if its caller is cancelled)."""
        env = self._environment()
        if secret and not self.secret_file:
            env[SECRET_VARIABLE] = self.secret.decode()
        try:
            proc = await asyncio.create_subprocess_exec(
                self.commands[name],
                *args,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # a notebook interrupt must not reach it
            )
        except OSError as exc:
            raise LaunchError(
                f"cannot run {self.commands[name]!r}: {exc} (is this a SLURM login "
                f"node? give {name}= the command's path)"
            ) from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise LaunchError(
                f"{name} did not answer within {timeout:g} s (slurmctld down?)"
            ) from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # not left retrying a controller that is down
            raise
        code = proc.returncode
        assert code is not None
        return code, out.decode(errors="replace"), err.decode(errors="replace").strip()

    async def _register_to(self, index: int) -> str:
        if self.register_host and self.register_host not in ("0.0.0.0", "::"):
            return self.register_host
        if self._controller_route is None:
            controller, port = await self._controller()
            self._controller_route = await asyncio.get_running_loop().run_in_executor(
                None, route_address, controller, port
            )
        return self._controller_route

    async def _controller(self) -> tuple[str, int]:
        """slurmctld's address and port, from ``scontrol show config``."""
        code, out, err = await self._run("scontrol", "show", "config")
        if code != 0:
            said = "; ".join(line for line in (err or out).splitlines() if line)
            if "Unable to contact" in said:  # configured, but slurmctld is down
                fix = (
                    "slurmctld does not answer (down, or restarting): try again "
                    "once `scontrol ping` says it is UP"
                )
            else:
                fix = (
                    "SlurmNodes submits its nodes with SLURM's commands, which must "
                    "work on this machine: run it on a login node of the cluster (or "
                    "set SLURM_CONF to the cluster's slurm.conf), where `scontrol "
                    "show config` works"
                )
            raise LaunchError(f"scontrol show config failed ({said}): {fix}")
        host, port = "", 6817
        for line in out.splitlines():
            key, _, value = (part.strip() for part in line.partition("="))
            if key.startswith("SlurmctldHost") and not host:
                name, _, addr = value.partition("(")
                host = addr.rstrip(")") or name
            elif key == "SlurmctldPort":
                with contextlib.suppress(ValueError):
                    port = int(value.split("-")[0])
        if not host:
            raise LaunchError(
                "scontrol show config names no SlurmctldHost: give register_host= "
                "(this machine's address that the compute nodes reach)"
            )
        return host, port

    async def _launch(self, index: int, name: str, register_to: str) -> SlurmJob:
        script = self.job_script(name, register_to)
        code, out, err = await self._run(
            "sbatch", "--parsable", "--export=ALL", stdin=script.encode(), secret=True
        )
        job_id = out.strip().split(";")[0]
        if code != 0 or not job_id.isdigit():
            raise LaunchError(
                f"sbatch refused node {name}: {err or out or f'status {code}'}"
            )
        logger.info("submitted node %s as SLURM job %s", name, job_id)
        self._live_ids.add(job_id)
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._follow())
        return SlurmJob(name, job_id, self._output_of(job_id))

    def _output_of(self, job_id: str) -> str | None:
        """Where SLURM writes the job's output: ``log_directory``, else SLURM's
        default (``slurm-<jobid>.out`` in sbatch's working directory, this one's)
        unless a directive chose another."""
        if self._log_directory is not None:
            return os.path.join(self._log_directory, f"dispynb-node-{job_id}.out")
        if any(d.startswith(("--output", "-o")) for d in self.directives):
            return None
        return os.path.join(os.getcwd(), f"slurm-{job_id}.out")

    async def _stop(self, handle: SlurmJob) -> None:
        if self._closed:
            self._closing_jobs.append(handle)  # `_close` cancels them together
            return
        if not handle.ended:
            code, out, err = await self._run("scancel", handle.job_id)
            if code != 0:
                logger.warning("scancel %s: %s", handle.job_id, err or out)
        deadline = asyncio.get_running_loop().time() + STOP_WAIT
        while not handle.ended and asyncio.get_running_loop().time() < deadline:
            await self._refresh()
            if not handle.ended:
                await asyncio.sleep(0.5)
        if not handle.ended:
            logger.warning(
                "SLURM job %s (node %s) still %s %g s after scancel",
                handle.job_id,
                handle.name,
                handle.state,
                STOP_WAIT,
            )

    def _exit_reason(self, handle: SlurmJob) -> str | None:
        if not handle.ended:
            return None
        reason = f" ({handle.reason})" if handle.reason not in ("", "None") else ""
        said = (
            f"; {handle.output} ends: {handle.last_output}"
            if handle.last_output
            else ""
        )
        hint = missing_module_hint(handle.last_output, self.python, "on the nodes")
        return f"SLURM job {handle.job_id} {handle.state}{reason}{said}{hint}"

    def _not_registered(self, waiting: list[Launched[SlurmJob]], timeout: float) -> str:
        message = super()._not_registered(waiting, timeout)
        queued = [
            f"{x.handle.job_id} ({x.handle.reason})"
            for x in waiting
            if x.handle is not None and x.handle.state == "PENDING"
        ]
        if queued:
            message += (
                f"; SLURM has not started job(s) {', '.join(queued)} yet: on a busy "
                "cluster give wait= more seconds (the nodes are used as they come)"
            )
        return message

    def _registered(self, node: RegisteredNode) -> None:
        job = next((j for j in self.jobs if j.name == node.name), None)
        if job is not None:
            job.registered_at = time.monotonic()
            if job.state in QUEUED:
                job.state, job.reason = "RUNNING", "None"  # before squeue says so
        super()._registered(node)

    async def _close(self) -> None:
        await super()._close()
        self._finalizer.detach()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self._cancel_at_close([j for j in self._closing_jobs if not j.ended])

    async def _cancel_at_close(self, jobs: list[SlurmJob]) -> None:
        """Cancel the nodes' jobs with one ``scancel`` and wait (`STOP_WAIT`) for
        SLURM to end them; a controller that does not answer (`CLOSE_TIMEOUT`)
        leaves them to end by themselves, with one warning that says so."""
        if not jobs:
            return
        ids = [job.job_id for job in jobs]
        try:
            code, out, err = await self._run("scancel", *ids, timeout=CLOSE_TIMEOUT)
        except LaunchError as exc:
            code, out, err = -1, "", str(exc)
        if code != 0:
            self._left_running(ids, f"scancel failed: {err or out or code}")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_WAIT
        while any(not job.ended for job in jobs) and loop.time() < deadline:
            try:
                await self._refresh(min(CLOSE_TIMEOUT, deadline - loop.time()))
            except LaunchError as exc:
                live = [job.job_id for job in jobs if not job.ended]
                self._left_running(live, f"after scancel, {exc}")
                return
            if any(not job.ended for job in jobs):
                await asyncio.sleep(0.5)
        for job in jobs:
            if not job.ended:
                logger.warning(
                    "SLURM job %s (node %s) still %s %g s after scancel",
                    job.job_id,
                    job.name,
                    job.state,
                    STOP_WAIT,
                )

    def _left_running(self, ids: list[str], why: str) -> None:
        """Warn that the jobs ``ids`` may still run after `close`, and until when."""
        if self.exit_without_client is not None:
            until = (
                f"each node ends its job once no client has been connected to it "
                f"for {self.exit_without_client:g} s (exit_without_client)"
            )
        else:
            until = "they hold their allocation until their walltime"
        logger.warning(
            "SlurmNodes closed without cancelling SLURM job(s) %s (%s): %s; "
            "or cancel them with `scancel %s` once slurmctld answers",
            ", ".join(ids),
            why,
            until,
            " ".join(ids),
        )

    def __repr__(self) -> str:
        states = ", ".join(f"{job.job_id} {job.state}" for job in self.jobs)
        return f"<SlurmNodes: {len(self.nodes)} registered; jobs: {states or 'none'}>"


def _cancel_now(scancel: str, job_ids: set[str], env: dict[str, str]) -> None:
    """Cancel the jobs of a launcher dropped without `close` (at interpreter exit)."""
    if job_ids:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [scancel, *sorted(job_ids)],
                env=env,
                timeout=CLOSE_TIMEOUT,
                check=False,
                capture_output=True,
            )


__all__ = ["SlurmJob", "SlurmNodes"]
