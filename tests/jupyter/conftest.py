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


@pytest.fixture(scope="session", autouse=True)
def _jupyter_client_loop() -> None:
    """jupyter_client's blocking calls run on an event loop jupyter_core makes for
    the calling thread on first use and keeps for the process's life; make it before
    any test, so that the first test to start a kernel is not charged with its
    descriptors by the leak check (it failed alone, and passed after another
    kernel test)."""
    from jupyter_core.utils import ensure_event_loop

    ensure_event_loop()
