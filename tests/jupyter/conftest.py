"""Fixtures for the Jupyter layer: local nodes shared by a module, an IPython shell."""

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
