"""A newcomer's `Executor` call whose function closes over a large array: the
function is pickled by value with each `submit` and ``map`` (so it sees its
globals as they are then), and each job carried all its bytes to the node, a
8 MB closure costing 8 MB per call over the network. Now a large function that
calls reuse goes to each node once (`JobCluster.put`); what the client sent to
the node is counted by the cluster (``DispyNode.tx``), as ``print_status``
shows it. The node runs on another namespace host: on 127.0.0.1 large arguments
go through /dev/shm, not the connection.
"""

from __future__ import annotations

import pytest

from tests.multihost.conftest import Site

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

CLIENT = """
import numpy as np

from dispynb import Executor

MB = 1 << 20


def main(args):
    table = np.arange(MB, dtype=np.float64)  # 8 MB, in the closures below
    with Executor(nodes=[args["node"]]) as executor:
        futures = [executor.submit(lambda i: float(table[i]), i) for i in range(6)]
        submitted = [f.result() for f in futures]
        mapped = list(executor.map(lambda i: float(table[-i]), range(1, 7)))
        sent = sum(node.tx for node in executor.cluster.status().nodes)
    return {"submitted": submitted, "mapped": mapped, "sent_mb": sent / MB}
"""


def test_a_large_closure_goes_to_the_node_once_per_call_site(site: Site) -> None:
    node = site.start(site.node_hosts[0], "--cpus", "2")
    out = site.run_client(CLIENT, {"node": node.spec}, timeout=120, secret=site.secret)
    assert out["submitted"] == [float(i) for i in range(6)]
    assert out["mapped"] == [float((1 << 20) - i) for i in range(1, 7)]
    # 12 jobs: 96 MB when each carried the 8 MB function; now the first submit's
    # own (a function used once is not put) and each call site's put: 3 x 8 MB.
    assert out["sent_mb"] < 30, out
