"""The sidebar following %%dispy runs on the Dask and Ray engines, in JupyterLab and
Chromium (run in private network namespaces by `test_lab_browser`'s
``test_lab_panel_in_private_network`` and ``test_lab_ray_in_private_network``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.browser import requires_chromium
from tests.labextension.labpage import (
    PANEL,
    Lab,
    card_counts,
    closed_statuses,
    notebook_page,
    output,
    start_run,
    stop_kernel,
    wait_counts,
    wait_prompt,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, requires_chromium]

#: The same journey on the Dask engine: a Dask LocalCluster of two one-thread workers
#: (``%dispy local --engine dask``), a %%dispy run the sidebar follows, then Stop.
DASK_CELLS = [
    "%load_ext dispynb\n%dispy local --engine dask --nodes 2 --cpus 1",
    '%%dispy --over "range(30)" --into slow\n'
    "def slow(i):\n"
    "    import time\n"
    "    time.sleep(1)\n"
    "    return i",
]


#: The journey on a Ray cluster (``ray start --head`` in the test's namespaces, its
#: address put in for ``{address}``): ``%dispy ray ADDRESS``, then a %%dispy run.
RAY_CELLS = [
    "%load_ext dispynb\n%dispy ray {address}",
    '%%dispy --over "range(30)" --into slow\n'
    "def slow(i):\n"
    "    import time\n"
    "    time.sleep(1)\n"
    "    return i",
]


@pytest.mark.timeout(300)
def test_lab_dask(lab: Lab) -> None:  # collected only in the namespace: conftest.py
    """The sidebar follows a %%dispy run on the Dask engine: its cluster card shows
    the two Dask workers and the counts moving; Stop ends the run."""
    with notebook_page(lab, "dask.ipynb", DASK_CELLS) as page:
        printed = start_run(page)
        assert "dispynb: dask engine: local Dask cluster tcp://127.0.0.1:" in printed
        card = page.locator(f"{PANEL} .dispynb-cluster")
        assert card.locator(".dispynb-cluster-name").inner_text() == "slow"
        nodes = card.locator(".dispynb-node")
        page.wait_for_function(
            """() => document.querySelectorAll(
                '#dispynb-sidebar .dispynb-cluster .dispynb-node').length === 2"""
        )
        for i in range(2):
            address = nodes.nth(i).get_attribute("data-address") or ""
            assert address.startswith("tcp://127.0.0.1:"), address  # a Dask worker
            assert nodes.nth(i).get_attribute("data-cpus") == "1"
            # Dask's workers report no load: unknown, not 'not reported yet'
            # (as if it would come).
            info = nodes.nth(i).locator(".dispynb-node-info").inner_text()
            assert info.startswith("1 CPU · ") and info.endswith("· load unknown"), info
        wait_counts(page, "c.total === 30 && c.running === 2")
        first = card_counts(page)
        wait_counts(page, f"c.ended >= {first['ended'] + 2}")
        stop_and_check(page)


def stop_and_check(page: Page) -> None:
    """Stop (the toolbar) the run of cell 1: its cell says so, its closed card
    counts its jobs cancelled, none failed."""
    stop_kernel(page)
    wait_prompt(page, 1, "[2]:")
    text = output(page, 1)
    assert "Interrupted: run 'slow' stopped" in text, text
    statuses = closed_statuses(page)
    assert "cancelled" in statuses and "failed" not in statuses, statuses


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A Ray cluster (``ray start --head``, 2 CPUs) in the test's namespaces; its
    token in this process's environment, which `lab` (hence its kernels) inherits,
    as a user exports it. Its address."""
    from tests.backends.rayhead import RayHead

    head = RayHead.start(cpus=2)
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update({name: head.env[name] for name in saved})
    try:
        yield head.address
    finally:
        head.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.mark.timeout(450)
def test_lab_ray(ray_head: str, lab: Lab) -> None:  # only in the namespace: conftest.py
    """The sidebar follows a %%dispy run on the Ray engine: its cluster card shows
    the Ray node with its 2 CPUs and the counts moving; Stop ends the run."""
    cells = [cell.replace("{address}", ray_head) for cell in RAY_CELLS]
    with notebook_page(lab, "ray.ipynb", cells, timeout_ms=120_000) as page:
        printed = start_run(page)
        assert f"dispynb: ray engine: {ray_head}" in printed, printed
        card = page.locator(f"{PANEL} .dispynb-cluster")
        assert card.locator(".dispynb-cluster-name").inner_text() == "slow"
        node = card.locator(".dispynb-node")
        node.first.wait_for()
        assert node.count() == 1  # the head, the one Ray node
        assert node.first.get_attribute("data-cpus") == "2"
        wait_counts(page, "c.total === 30 && c.running === 2")
        first = card_counts(page)
        wait_counts(page, f"c.ended >= {first['ended'] + 2}")
        stop_and_check(page)
