"""What the chaos tests check of the jobs a fault ended."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from dispynb import DispyJob
from tests.jobs import wait_until


def assert_abandoned(jobs: Iterable[DispyJob], reason: str) -> None:
    """Every job of ``jobs`` ended ``Abandoned``, its reason starting ``reason``."""
    for job in jobs:
        assert job.status == DispyJob.Abandoned, job
        assert str(job.exception).startswith(reason), job.exception


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_stopped(pid: int, timeout: float = 30) -> None:
    """Wait until the process ``pid`` (a job's worker) no longer runs."""
    wait_until(lambda: not alive(pid), timeout=timeout)


def hold_two(cluster: Any, marks: Path, release: Path) -> tuple[list[DispyJob], int]:
    """Submit two `mark_and_hold` jobs (on one CPU: one runs, one waits behind);
    once the first runs, return both and the pid of the first's worker."""
    args = (str(marks), str(release))
    jobs = [cluster.submit(n, *args) for n in range(2)]
    wait_until(lambda: (marks / "0").exists(), timeout=30)
    return jobs, int((marks / "0").read_text())
