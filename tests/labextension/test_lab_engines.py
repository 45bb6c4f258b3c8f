"""The sidebar following %%dispy runs on the Dask and Ray engines, in JupyterLab and
Chromium (run in private network namespaces by `test_lab_browser`'s
``test_lab_panel_in_private_network`` and ``test_lab_ray_in_private_network``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.browser import chromium_page, requires_chromium
from tests.labextension.labpage import (
    PANEL,
    Lab,
    card_counts,
    open_notebook,
    run_cell,
    wait_counts,
    wait_prompt,
    write_notebook,
)

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
    write_notebook(lab, "dask.ipynb", DASK_CELLS)
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=60_000
    ) as page:
        open_notebook(page, lab, "dask.ipynb", "Python 3 (ipykernel)")
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
        cells = page.locator(".jp-NotebookPanel .jp-Cell")
        run_cell(page, 0)
        wait_prompt(page, 0, "[1]:")
        assert "dispynb: dask engine: local Dask cluster tcp://127.0.0.1:" in (
            cells.nth(0).inner_text()
        )

        run_cell(page, 1)
        card = page.locator(f"{PANEL} .dispynb-cluster")
        card.first.wait_for()
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

        page.locator(
            '.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"]'
        ).click()
        wait_prompt(page, 1, "[2]:")
        output = cells.nth(1).locator(".jp-OutputArea").inner_text()
        assert "Interrupted: run 'slow' stopped" in output, output
        closed = page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]')
        closed.first.wait_for()
        statuses = closed.locator(".dispynb-count").evaluate_all(
            "es => es.map(e => e.dataset.status)"
        )
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
    write_notebook(lab, "ray.ipynb", cells)
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=120_000
    ) as page:
        open_notebook(page, lab, "ray.ipynb", "Python 3 (ipykernel)")
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
        cells = page.locator(".jp-NotebookPanel .jp-Cell")
        run_cell(page, 0)
        wait_prompt(page, 0, "[1]:")
        assert f"dispynb: ray engine: {ray_head}" in cells.nth(0).inner_text(), (
            cells.nth(0).inner_text()
        )

        run_cell(page, 1)
        card = page.locator(f"{PANEL} .dispynb-cluster")
        card.first.wait_for()
        assert card.locator(".dispynb-cluster-name").inner_text() == "slow"
        node = card.locator(".dispynb-node")
        node.first.wait_for()
        assert node.count() == 1  # the head, the one Ray node
        assert node.first.get_attribute("data-cpus") == "2"
        wait_counts(page, "c.total === 30 && c.running === 2")
        first = card_counts(page)
        wait_counts(page, f"c.ended >= {first['ended'] + 2}")

        page.locator(
            '.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"]'
        ).click()
        wait_prompt(page, 1, "[2]:")
        output = cells.nth(1).locator(".jp-OutputArea").inner_text()
        assert "Interrupted: run 'slow' stopped" in output, output
        closed = page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]')
        closed.first.wait_for()
        statuses = closed.locator(".dispynb-count").evaluate_all(
            "es => es.map(e => e.dataset.status)"
        )
        assert "cancelled" in statuses and "failed" not in statuses, statuses
