"""What the chaos tests check of the jobs a fault ended."""

from __future__ import annotations

from collections.abc import Iterable

from dispynb import DispyJob


def assert_abandoned(jobs: Iterable[DispyJob], reason: str) -> None:
    """Every job of ``jobs`` ended ``Abandoned``, its reason starting ``reason``."""
    for job in jobs:
        assert job.status == DispyJob.Abandoned, job
        assert str(job.exception).startswith(reason), job.exception
