"""The pages install dispynb as getting started does, from a checkout: dispynb is not
on PyPI, so ``pip install 'dispynb[ray]'`` on a machine without it (a Ray node, a
Dask worker) finds nothing there, or whatever someone else published under the name."""

from __future__ import annotations

import re
import sys
import tomllib

import pytest

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


#: The packages whose messages and docstrings users read.
PRODUCT = ("dispynb", "nodeserver", "schedserver")


def test_pages_and_messages_never_install_dispynb_from_pypi() -> None:
    """No page (the reference included) and no message of the product spells an
    install as ``dispynb[extra]``: the API reference told users to ``pip install
    'dispynb[jupyter]'``, the Dask and Ray engines' errors ``pip install
    'dispynb[dask]'``, which fail (or install a stranger's package)."""
    files = [
        *PAGES,
        *sorted((ROOT / "docs" / "reference").glob("*.rst")),
        *(
            path
            for package in PRODUCT
            for path in sorted((ROOT / package).rglob("*.py"))
        ),
    ]
    wrong = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"(?<![\w.-])dispynb\[\w+\]", line)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_dask_engine_without_dask_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``LocalCluster(engine='dask')`` where Dask is not installed names a command
    that installs it."""
    from dispynb import LocalCluster
    from dispynb.errors import ConfigurationError

    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails
    with pytest.raises(ConfigurationError) as info:
        LocalCluster(nodes=1, cpus=1, engine="dask")
    assert "pip install 'dask[distributed]'" in str(info.value)
