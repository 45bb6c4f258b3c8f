"""Engine tests that run third-party servers (Ray) run only inside a private network.

`test_ray_netns.py::test_ray_in_private_network` re-runs pytest on `test_ray.py` under
``unshare -n -p -f --mount-proc`` (loopback only, its own PIDs). Outside, the tests
of the modules in `IN_NETNS` are deselected (not reported as skipped: they run in the
inner pytest); inside, the outer test is.
"""

from __future__ import annotations

import os

import pytest

#: Modules whose tests run only inside the private namespace.
IN_NETNS = ("test_ray.py",)

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
