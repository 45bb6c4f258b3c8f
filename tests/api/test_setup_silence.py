"""A client waiting for its computation's setup has nothing to say to the node, but
it is no silent (zombie) client: it pings the node while the setup runs, however
long it takes. (Before, it pinged only once the computation was ready: a node's
``--zombie_interval`` freed the computation of a client waiting for a setup that
long, and a shared scheduler ended the session; see also
tests/sharedsched/test_zombie.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import JobCluster
from tests.nodeproc import start_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def slow_setup() -> int:
    import time

    time.sleep(9.0)  # 1.5 times the node's --zombie_interval of 6 s
    return 0


def double(n: int) -> int:
    return 2 * n


def test_a_setup_longer_than_the_nodes_zombie_interval_keeps_its_client(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path / "node", "--zombie_interval", "0.1")
    try:
        with JobCluster(
            double, nodes=[node.spec], secret=node.secret, setup=slow_setup
        ) as cluster:
            assert cluster.submit(21)() == 42
    finally:
        assert node.stop() == 0
    assert "silent for" not in node.log_text()
