"""The example notebooks run as tests (nbval, see pyproject's addopts): mark them.

Each cell is a test item; they start real local node servers, hence ``slow`` too.
Deselect them with ``-m "not notebook"``.

A notebook that needs machines this one does not have (SSH hosts, a batch system)
names the environment variable that points it at them in its metadata
(``{"dispynb": {"requires_env": "NAME"}}``): it is collected only when that variable
is set, by the test that builds such machines and runs it with nbval there (e.g.
``tests/multihost/test_ssh_notebook.py`` for ``08-ssh-nodes.ipynb``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def required_env(path: Path) -> str | None:
    """The environment variable a notebook needs (its metadata says), or None."""
    metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    needs = metadata.get("dispynb", {}).get("requires_env")
    return str(needs) if needs else None


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if collection_path.suffix != ".ipynb":
        return None
    needs = required_env(collection_path)
    return True if needs and not os.environ.get(needs) else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebook)
            item.add_marker(pytest.mark.slow)
