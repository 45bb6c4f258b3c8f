"""SLURM's batch jobs of a `dispynb.deploy.slurm.SlurmNodes`, and following them.

`SlurmJob` is one node's batch job, as ``squeue`` last said it was. `_JobStates`
is the part of `SlurmNodes` that polls ``squeue`` while jobs live (`_refresh`):
a job that ended is said with SLURM's reason (a walltime is a warning), one
suspended or resumed is an event, and one SLURM put back in its queue after its
node registered takes that node out of `nodes` until it runs again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import TYPE_CHECKING

from dispynb.deploy.adaptive import ScaleEvent
from dispynb.deploy.launcherstate import Changes, Launched
from dispynb.errors import LaunchError

# Under the launcher's name (its records are `SlurmNodes`').
logger = logging.getLogger("dispynb.deploy.slurm")

#: Seconds a SLURM command may take.
COMMAND_TIMEOUT = 60.0
#: Seconds between two ``squeue`` calls that follow the jobs' states.
POLL_INTERVAL = 2.0

#: Job states after which a job runs no more (``squeue --states=all``).
ENDED = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)

#: Job states of a job SLURM put back in the queue (``scontrol requeue``,
#: preemption with ``PreemptMode=REQUEUE``, a failed compute node): it runs again.
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"})
#: The state of a job whose processes SLURM stopped (SIGSTOP) until it resumes it.
SUSPENDED = "SUSPENDED"


class SlurmJob:
    """One batch job running (or waiting to run) a node server."""

    def __init__(self, name: str, job_id: str, output: str | None = None) -> None:
        self.name = name
        self.job_id = job_id
        #: The job's output file (its node's log), if known.
        self.output = output
        #: Its last line, read once the job ended (why a node could not start).
        self.last_output = ""
        #: SLURM's last reported state (``PENDING``, ``RUNNING``, ``TIMEOUT``...).
        self.state = "PENDING"
        #: SLURM's reason for the state (``Resources``, ``None``...).
        self.reason = ""
        #: Monotonic seconds its node last registered (None: not since it was
        #: queued).
        self.registered_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED or self.state == "UNKNOWN"

    def __repr__(self) -> str:
        return f"<SlurmJob {self.job_id} {self.name} {self.state}>"


class _JobStates:
    """The part of `SlurmNodes` that follows its jobs' states (a mixin: the
    launcher gives the attributes below)."""

    _changed: Changes
    _launched: list[Launched[SlurmJob]]
    _closed: bool
    _live_ids: set[str]
    events: collections.deque[ScaleEvent]

    if TYPE_CHECKING:  # given by `SlurmNodes` and `NodeLauncher`

        @property
        def jobs(self) -> list[SlurmJob]: ...

        async def _run(
            self,
            name: str,
            *args: str,
            stdin: bytes | None = None,
            secret: bool = False,
            timeout: float = ...,
        ) -> tuple[int, str, str]: ...

        def _exit_reason(self, handle: SlurmJob) -> str | None: ...

    async def _follow(self) -> None:
        """Poll the jobs' states until every one ended (or the launcher closed).

        A controller that does not answer (restarting, down) is said once, and
        so is its return (each failed ``squeue`` was a warning: one every 11 s,
        ``squeue`` retrying for 9 s)."""
        failing = False
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self._refresh()
            except LaunchError as exc:
                (logger.debug if failing else logger.warning)(
                    "cannot follow the nodes' SLURM jobs: %s (trying again every "
                    "%g s; the nodes go on meanwhile)",
                    exc,
                    POLL_INTERVAL,
                )
                failing = True
            else:
                if failing:
                    logger.info("following the nodes' SLURM jobs again")
                failing = False
            if self._closed and not self._live_ids:
                return

    async def _refresh(self, timeout: float = COMMAND_TIMEOUT) -> None:
        """Read the states of the jobs that have not ended (``squeue``)."""
        live = {job.job_id: job for job in self.jobs if not job.ended}
        if not live:
            return
        asked = time.monotonic()
        code, out, err = await self._run(
            "squeue", "--noheader", "--states=all", f"--jobs={','.join(live)}",
            "--format=%i|%T|%r", timeout=timeout,
        )  # fmt: skip
        seen: dict[str, tuple[str, str]] = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 3:
                seen[fields[0]] = (fields[1], fields[2])
        if code != 0 and "Invalid job id" not in err:
            raise LaunchError(f"squeue failed: {err or out}")
        changed = []
        for job_id, job in live.items():
            state, reason = seen.get(job_id, ("UNKNOWN", "no longer known to SLURM"))
            if (state, reason) != (job.state, job.reason):
                if SUSPENDED in (state, job.state) and state != job.state:
                    self._suspension(job, state, reason)
                job.state, job.reason = state, reason
                changed.append(job)
        with self._changed:
            stopped = {x.name for x in self._launched if x.stopped or x.draining}
        for job in changed:
            if (
                job.state in QUEUED
                and job.registered_at is not None
                and job.registered_at < asked  # not a registration squeue missed
            ):
                self._requeued(job)
            if job.ended:
                self._live_ids.discard(job.job_id)
                if job.state != "CANCELLED":
                    job.last_output = _last_line(job.output)
                # a warning only for jobs SLURM ended by itself (walltime...)
                expected = self._closed or job.name in stopped
                log = logger.info if expected else logger.warning
                log("node %s ended: %s", job.name, self._exit_reason(job))
        if changed:
            with self._changed:
                self._changed.notify_all()

    def _suspension(self, job: SlurmJob, state: str, reason: str) -> None:
        """SLURM suspended the node's job (``scontrol suspend``, gang scheduling,
        ``PreemptMode=SUSPEND``: every process of it stopped), or let it run again.

        Nothing else to do: the clusters find a stopped node silent and run its
        reentrant jobs elsewhere, then connect to it again once it answers. A job
        that leaves ``SUSPENDED`` other than for ``RUNNING`` is said by `_refresh`
        (ended) or `_requeued`."""
        detail = f"SLURM job {job.job_id} {state}"
        if reason not in ("", "None"):
            detail += f" ({reason})"
        if state == SUSPENDED:
            self.events.append(ScaleEvent(time.time(), "suspended", job.name, detail))
            logger.warning(
                "node %s suspended: %s; its jobs are stopped until SLURM resumes "
                "it (clusters run its reentrant jobs elsewhere)",
                job.name,
                detail,
            )
        elif state == "RUNNING":
            self.events.append(ScaleEvent(time.time(), "resumed", job.name, detail))
            logger.info("node %s resumed: %s", job.name, detail)
        # Otherwise it ended, or was requeued, while suspended: said as such.

    def _requeued(self, job: SlurmJob) -> None:
        """SLURM put the job of a registered node back in its queue: the node was
        stopped (SIGTERM, as at a walltime); it is no longer one of `nodes` until
        the job runs again and its new node registers."""
        job.registered_at = None
        with self._changed:
            launched = next((x for x in self._launched if x.name == job.name), None)
            if launched is None or launched.node is None:
                return
            launched.node = None
            self._changed.notify_all()
        reason = f" ({job.reason})" if job.reason not in ("", "None") else ""
        detail = f"SLURM job {job.job_id} requeued: {job.state}{reason}"
        self.events.append(ScaleEvent(time.time(), "requeued", job.name, detail))
        logger.warning(
            "node %s left: %s; its node stopped, and a new one registers when "
            "SLURM runs the job again",
            job.name,
            detail,
        )


def _last_line(path: str | None) -> str:
    """The last line of a job's output file (what a node that could not start said,
    a shell's 'not found'...), cut short; "" if it cannot be read."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.fstat(file.fileno()).st_size - 4096))
            tail = file.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


__all__ = ["ENDED", "POLL_INTERVAL", "QUEUED", "SUSPENDED", "SlurmJob"]
