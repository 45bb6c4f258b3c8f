"""The built reference covers the code: every public name, every option of the
programs and magics, and every dispy name of the migration guide's list."""

from __future__ import annotations

import argparse
import html
import importlib
import re

import pytest
from dispynb_docs import public_names

from tests.browser import requires_chromium
from tests.docs.conftest import ROOT, Site

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    requires_chromium,
    pytest.mark.timeout(600),
]

#: Modules whose ``__all__`` the API reference documents.
PUBLIC_MODULES = [
    "dispynb",
    "dispynb.deploy",
    "dispynb.joblib_backend",
    "dispynb.jupyter",
    "dispynb.httpd",
    "dispynb.errors",
]


def _page(site: Site, name: str) -> str:
    return (site.path / name).read_text(encoding="utf-8")


def _ids(text: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', text))


def test_api_reference_has_every_public_name(site: Site) -> None:
    ids = _ids(_page(site, "reference/api.html"))
    text = _page(site, "reference/api.html")
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in public_names(module):
            target = f"{module_name}.{name}"
            # Documented, or (re-exported) a pointer to where it is documented.
            pointer = f'<span class="pre">{target}</span></code>: see'
            if target not in ids and pointer not in text:
                missing.append(target)
    assert not missing, f"not in the API reference: {missing}"


@pytest.mark.parametrize(
    "target", ["dispynb.JobCluster", "dispynb.Run", "dispynb.deploy.NodeLauncher"]
)
def test_api_reference_has_the_methods_a_class_has_from_its_parts(
    site: Site, target: str
) -> None:
    """A class split into modules (private dispynb base classes such as
    ``_Jobs``) shows their public methods as its own."""
    module_name, _, class_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    parts = [
        base
        for base in cls.__mro__[1:]
        if base.__module__.startswith("dispynb") and base.__name__.startswith("_")
    ]
    assert parts, f"{target} has no parts any more: test another class"
    inherited = {
        name
        for base in parts
        for name, member in vars(base).items()
        if not name.startswith("_")
        and callable(member)
        and getattr(member, "__doc__", None)
        and name not in vars(cls)
    }
    ids = _ids(_page(site, "reference/api.html"))
    missing = sorted(n for n in inherited if f"{target}.{n}" not in ids)
    assert inherited and not missing, f"{target}: not in the API reference: {missing}"


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _option_strings(sub)
        found += [s for s in action.option_strings if s not in ("-h", "--help")]
    return found


def _descnames(text: str) -> set[str]:
    names = re.findall(
        r'<span class="sig-name descname"><span class="pre">([^<]+)</span>', text
    )
    return {html.unescape(name) for name in names}


@pytest.mark.parametrize("module", ["nodeserver.cli", "schedserver.cli", "dispynb.cli"])
def test_cli_reference_has_every_option(site: Site, module: str) -> None:
    parser = importlib.import_module(module).build_parser()
    documented = _descnames(_page(site, "reference/cli.html"))
    missing = [s for s in _option_strings(parser) if s not in documented]
    assert not missing, f"options of {parser.prog} not in the CLI reference: {missing}"


def test_magics_reference_has_every_option(site: Site) -> None:
    from dispynb.jupyter.magics import DispyMagics

    text = html.unescape(re.sub(r"<[^>]+>", "", _page(site, "reference/magics.html")))
    for method in (DispyMagics.dispy, DispyMagics.cell_dispy):
        for option in _option_strings(method.parser):
            assert option in text, option


def test_migration_guide_covers_every_dispy_name(site: Site) -> None:
    """Each table lists, in order, every dispy name of dispy_names.py."""
    from dispynb_docs.migration import all_names

    text = _page(site, "reference/migration.html")
    for key, names in all_names().items():
        match = re.search(
            rf'<table class="[^"]*dispy-migration-{key}\b[^"]*".*?</table>', text, re.S
        )
        assert match, f"no table {key!r} in the migration guide"
        rows = re.findall(r"<tr[^>]*>\s*<td>(.*?)</td>", match.group(0), re.S)
        first = [html.unescape(re.sub(r"<[^>]+>", "", row)).strip() for row in rows]
        assert first == names, key


def test_every_notebook_is_a_tutorial_page(site: Site) -> None:
    """The notebooks nbval runs are the tutorials, each executed into a page."""
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for notebook in notebooks:
        page = site.path / "notebooks" / f"{notebook.stem}.html"
        assert page.is_file(), f"{notebook.name} has no page"
        assert "cell_output" in page.read_text(encoding="utf-8"), notebook.name
