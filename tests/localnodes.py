"""Module-scoped local nodes shared by the tests of a module (the conftests of
``tests/api``, ``tests/jupyter`` and ``tests/httpd`` take them from here).

The nodes are real ``python -m nodeserver`` processes on 127.0.0.1. Tests that use
these shared nodes must not kill or stop them (crashing or cancelling jobs is fine:
that only kills workers, which the node replaces).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dispynb import LocalCluster


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
