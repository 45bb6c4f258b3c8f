"""What the pages point a reader to exists: the repository's files they name
(``nodeserver/zygote.py``, ``tests/alongside.py``) and the dotted names of dispynb's
modules, functions and classes they cite (``dispynb.secret.estimate_bits``), so a file
moved or a function renamed cannot leave a page sending readers nowhere."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from tests.docs.conftest import DOCS, ROOT

PAGES = [
    ROOT / "README.md",
    *sorted(DOCS.glob("*.md")),
    *sorted((DOCS / "howto").glob("*.md")),
    *sorted((DOCS / "explanation").glob("*.md")),
    *sorted((DOCS / "reference").glob("*.rst")),
    ROOT / "schedserver" / "README.md",
]

#: The repository's own top-level folders a path in a page may start with.
TOP = ("dispynb", "nodeserver", "schedserver", "tests", "bench", "docs", "notebooks")

#: What builds and runs make, not in a checkout.
MADE = ("docs/_build", "bench/.venvs", "bench/results")


def _ids(pages: list[Path]) -> list[str]:
    return [str(page.relative_to(ROOT)) for page in pages]


def _paths(text: str) -> set[str]:
    """Repository paths in inline code: ```nodeserver/zygote.py```, ```tests/api/```."""
    found = set()
    for code in re.findall(r"`{1,2}([\w./-]+)`{1,2}", text):
        path = code.split("::")[0].rstrip(".")
        if "/" in path and path.split("/")[0] in TOP and not path.startswith(MADE):
            found.add(path)
    return found


def _resolves(dotted: str) -> bool:
    """Whether ``dotted``'s longest importable prefix has the rest as attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_the_checks_find_what_the_pages_cite() -> None:
    text = (DOCS / "explanation" / "architecture.md").read_text(encoding="utf-8")
    assert "nodeserver/zygote.py" in _paths(text)
    assert _resolves("dispynb.secret.estimate_bits")
    assert not _resolves("dispynb.secret.no_such_function")
    assert not _resolves("dispynb.no_such_module")


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_files_a_page_names_are_in_the_repository(page: Path) -> None:
    missing = [
        p for p in _paths(page.read_text(encoding="utf-8")) if not (ROOT / p).exists()
    ]
    assert not missing, f"{page.relative_to(ROOT)} names missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_names_a_page_cites_exist(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    cited = set(
        re.findall(r"(?<![\w./-])((?:dispynb|nodeserver|schedserver)(?:\.\w+)+)", text)
    )
    # a file name (dispynb/cli.py) or a sentence's full stop is not a dotted name
    cited = {name for name in cited if not name.endswith((".py", ".md", ".rst"))}
    missing = sorted(name for name in cited if not _resolves(name))
    assert not missing, f"{page.relative_to(ROOT)} cites what does not exist: {missing}"
