"""The pages install dispynb as getting started does, from a checkout: dispynb is not
on PyPI, so ``pip install 'dispynb[ray]'`` on a machine without it (a Ray node, a
Dask worker) finds nothing there, or whatever someone else published under the name."""

from __future__ import annotations

import re
import tomllib

from tests.docs.test_howto import PAGES, ROOT


def _installs() -> list[tuple[str, str]]:
    """``(page, requirement)`` for each word after ``pip install`` in the pages."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for command in re.findall(r"pip install ([^`\n#)]*)", text):
            for word in command.split():
                if not word.startswith("-"):
                    found.append((str(page.relative_to(ROOT)), word.strip("'\"")))
    return found


def test_pages_install_dispynb_from_a_checkout_with_extras_it_has() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = set(project["project"]["optional-dependencies"])
    installs = _installs()
    assert (("docs/getting-started.md", ".[jupyter]")) in installs
    wrong = []
    for page, requirement in installs:
        name, _, extra = requirement.partition("[")
        if name.lower() == "dispynb":
            wrong.append(f"{page}: pip install {requirement} (dispynb is not on PyPI)")
        elif name == "." and extra and extra.rstrip("]") not in extras:
            wrong.append(f"{page}: pip install {requirement} (no such extra)")
    assert not wrong, "\n".join(wrong)
