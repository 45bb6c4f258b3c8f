"""Every name a page tells users to import from dispynb is in the API reference
(``docs/reference/api.rst``), so that its parameters can be looked up there."""

from __future__ import annotations

import importlib
import re

from dispynb_docs import public_names

from tests.docs.conftest import DOCS, ROOT

API = DOCS / "reference" / "api.rst"

#: The pages a newcomer reads, where imports are shown.
PAGES = [
    ROOT / "README.md",
    DOCS / "index.md",
    DOCS / "getting-started.md",
    *sorted((DOCS / "howto").glob("*.md")),
    *sorted((DOCS / "explanation").glob("*.md")),
    DOCS / "security.md",
]


def _documented() -> set[str]:
    """Dotted names the API reference documents: each name of an autoall module's
    ``__all__``, and each ``autoclass``/``autofunction`` target."""
    text = API.read_text(encoding="utf-8")
    found = set(re.findall(r"^\.\. auto(?:class|function):: ([\w.]+)", text, re.M))
    for module_name in re.findall(r"^\.\. dispynb-autoall:: ([\w.]+)", text, re.M):
        module = importlib.import_module(module_name)
        found |= {f"{module_name}.{name}" for name in public_names(module)}
    return found


def _imports() -> list[tuple[str, str]]:
    """``(page, module.Name)`` for each ``from dispynb... import Name`` of a page."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for module, names in re.findall(
            r"^from (dispynb[\w.]*) import ([\w, ]+)$", text, re.M
        ):
            for name in names.split(","):
                found.append((str(page.relative_to(ROOT)), f"{module}.{name.strip()}"))
    return found


def test_pages_import_names_the_api_reference_documents() -> None:
    imports = _imports()
    assert any(target == "dispynb.deploy.SSHNodes" for _, target in imports)
    documented = _documented()
    missing = sorted({f"{page}: {t}" for page, t in imports if t not in documented})
    assert not missing, "not in the API reference:\n" + "\n".join(missing)
