"""Fixtures for the Jupyter layer: local nodes shared by a module, an IPython shell."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from dispynb.jupyter.labcomm import ClusterTracker, Discovered, LabLink
from tests import localnodes
from tests.jupyter.fakecomm import INTERVAL, FakeComm
from tests.jupyter.shell import magic_shell

#: The module-scoped local nodes, shared with tests/api.
local = localnodes.local
local1 = localnodes.local1


@pytest.fixture(scope="module")
def ip() -> Iterator[InteractiveShell]:
    """A shell with ``%load_ext dispynb`` and one local node with 2 CPUs (the
    magics' tests; a module that needs other nodes has its own)."""
    with magic_shell("--cpus 2") as shell:
        yield shell


@pytest.fixture
def link_of() -> Iterator[Callable[..., tuple[LabLink, FakeComm, ClusterTracker]]]:
    """Makes panel links (`LabLink`) over a fake comm, closed after the test."""
    made: list[tuple[LabLink, ClusterTracker]] = []

    def make(
        clusters: Callable[[], list[Any]], **kwargs: Any
    ) -> tuple[LabLink, FakeComm, ClusterTracker]:
        comm = FakeComm()
        tracker = ClusterTracker(clusters)
        kwargs.setdefault("session", lambda: {"kind": "", "nodes": []})
        link = LabLink(
            comm.send,
            tracker=tracker,
            discovered=kwargs.pop("discovered", Discovered()),
            interval=INTERVAL,
            **kwargs,
        )
        made.append((link, tracker))
        return link, comm, tracker

    yield make
    for link, tracker in made:
        link.close()
        tracker.close()


@pytest.fixture(scope="session", autouse=True)
def _jupyter_client_loop() -> None:
    """jupyter_client's blocking calls run on an event loop jupyter_core makes for
    the calling thread on first use and keeps for the process's life; make it before
    any test, so that the first test to start a kernel is not charged with its
    descriptors by the leak check (it failed alone, and passed after another
    kernel test)."""
    from jupyter_core.utils import ensure_event_loop

    ensure_event_loop()
