"""Fixtures for end-to-end API tests: local nodes shared by the tests of a module.

The nodes are real ``python -m nodeserver`` processes on 127.0.0.1. Tests that use
these shared nodes must not kill or stop them (crashing or cancelling jobs is fine:
that only kills workers, which the node replaces).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dispynb import LocalCluster
from dispynb.executor import Executor


@pytest.fixture(scope="module")
def local() -> Iterator[LocalCluster]:
    """One local node with 2 CPUs."""
    with LocalCluster(cpus=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def local1() -> Iterator[LocalCluster]:
    """One local node with 1 CPU: its jobs run one after the other."""
    with LocalCluster(cpus=1) as cluster:
        yield cluster


@pytest.fixture
def executor(local: LocalCluster) -> Iterator[Executor]:
    """An executor on the module's 2-CPU node (its computation closes per test)."""
    with Executor(nodes=local) as executor:
        yield executor
