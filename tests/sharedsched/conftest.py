"""Fixtures: local node servers shared by a real scheduler process, and its users."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster
from tests.sharedsched.harness import SchedulerProcess, add_user


@pytest.fixture
def nodes() -> Iterator[LocalCluster]:
    """Two local node servers with 2 CPUs each."""
    with LocalCluster(nodes=2, cpus=2) as local:
        yield local


@pytest.fixture
def users(tmp_path: Path) -> dict[str, Path]:
    """Users alice and bob: their credential files."""
    return {name: add_user(tmp_path, name) for name in ("alice", "bob")}


@pytest.fixture
def scheduler(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler process owning ``nodes``."""
    sched = SchedulerProcess(tmp_path, nodes.node_specs(), nodes.secret)
    sched.start()
    try:
        yield sched
    finally:
        sched.stop()
