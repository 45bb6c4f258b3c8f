"""Fixtures for end-to-end API tests: local nodes shared by the tests of a module
(`tests.localnodes`: tests must not kill or stop them), an executor on them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dispynb import LocalCluster
from dispynb.executor import Executor
from tests import localnodes

#: The module-scoped local nodes, shared with tests/jupyter.
local = localnodes.local
local1 = localnodes.local1


@pytest.fixture
def executor(local: LocalCluster) -> Iterator[Executor]:
    """An executor on the module's 2-CPU node (its computation closes per test)."""
    with Executor(nodes=local) as executor:
        yield executor
