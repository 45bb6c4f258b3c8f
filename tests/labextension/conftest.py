"""The in-namespace half of the browser test is collected only inside the namespace.

`test_lab_browser.test_lab_panel_in_private_network` re-runs pytest under
``unshare -n`` on `test_lab_browser.test_lab_panel` and ``test_lab_stop``; outside
it, that half is
deselected (not reported as skipped: it does run, in the inner pytest).
"""

from __future__ import annotations

import os

import pytest

INNER = (
    "test_lab_browser.py::test_lab_panel",
    "test_lab_browser.py::test_lab_stop",
    "test_lab_browser.py::test_lab_page_opened_while_a_cell_runs",
    "test_lab_browser.py::test_lab_outcomes_as_the_cell_says",
    "test_lab_browser.py::test_lab_dask",
    "test_lab_browser.py::test_lab_ray",
    "test_lab_saved.py::test_lab_saved_notebook_opened_again",
)


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if os.environ.get("DISPYNB_IN_NETNS") == "1":
        return
    inner = [item for item in items if item.nodeid.endswith(INNER)]
    if inner:
        config.hook.pytest_deselected(items=inner)
        items[:] = [item for item in items if item not in inner]
