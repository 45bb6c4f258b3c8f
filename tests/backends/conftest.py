"""Engine tests that run third-party servers (Ray) run only inside a private network.

`test_ray_netns.py::test_ray_in_private_network` re-runs pytest on the modules of
`IN_NETNS` under ``unshare -n -p -f --mount-proc`` (loopback only, its own PIDs).
Outside, their tests are deselected (not reported as skipped: they run in the inner
pytest); inside, the outer test is. Inside, they share one Ray cluster (``head``).

The Dask tests run their client programs in a namespace host: ``net``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dispynb.backends.ray import RayEngine
from tests.backends.rayhead import RayHead
from tests.multihost.netns import Network, hosts_or_skip

#: Modules whose tests run only inside the private namespace, in the order the inner
#: pytest runs them (test_ray_nodes.py adds nodes to the shared Ray cluster: last).
IN_NETNS = (
    "test_ray.py",
    "test_ray_messages.py",
    "test_ray_data.py",
    "test_ray_output.py",
    "test_ray_stop.py",
    "test_ray_batches.py",
    "test_ray_nodes.py",
)

#: The outer tests (they start the inner pytest).
OUTER = ("test_ray_netns.py::test_ray_in_private_network",)


def inside() -> bool:
    """True in the inner pytest (in the private namespace)."""
    return os.environ.get("DISPYNB_IN_NETNS") == "1"


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if inside():
        drop = [item for item in items if item.nodeid.endswith(OUTER)]
    else:
        drop = [item for item in items if item.path.name in IN_NETNS]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]


@pytest.fixture(scope="session")
def head() -> Iterator[RayHead]:
    """The Ray cluster of the Ray tests (`IN_NETNS`), started once for all of them."""
    head = RayHead.start(cpus=2)
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    # The client needs the cluster's token, as a user's would (Ray's token auth).
    os.environ["RAY_AUTH_MODE"] = head.env["RAY_AUTH_MODE"]
    os.environ["RAY_AUTH_TOKEN"] = head.env["RAY_AUTH_TOKEN"]
    # This process stays connected for the run (Ray's driver threads and
    # sockets belong to it, not to a test), as a notebook's kernel would.
    RayEngine(head.address).connect()
    try:
        yield head
    finally:
        import ray

        ray.shutdown()
        head.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def engine(head: RayHead) -> RayEngine:
    return RayEngine(head.address)


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    """One namespace host: a module's client programs and their LocalCluster run
    there (a module that needs more hosts has its own)."""
    with hosts_or_skip(1) as network:
        yield network
