"""The example notebooks run as tests (nbval, see pyproject's addopts): mark them.

Each cell is a test item; they start real local node servers, hence ``slow`` too.
Deselect them with ``-m "not notebook"``.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebook)
            item.add_marker(pytest.mark.slow)
