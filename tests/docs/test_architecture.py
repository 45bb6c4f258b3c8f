""" "How dispynb is built" lays out the repository as it is: every top-level folder,
every subpackage of ``dispynb`` and every command of the ``dispynb`` program."""

from __future__ import annotations

import argparse
import re

from dispynb.cli import build_parser
from tests.docs.conftest import ROOT

PAGE = ROOT / "docs" / "explanation" / "architecture.md"


def _layout() -> str:
    text = PAGE.read_text(encoding="utf-8")
    match = re.search(r"## Layout of the repository\n+```\n(.*?)```", text, re.S)
    assert match, "no layout block in architecture.md"
    return match.group(1)


def test_layout_names_every_top_level_folder() -> None:
    named = set(re.findall(r"(?m)^([\w.-]+)/", _layout()))
    folders = {
        path.name
        for path in ROOT.iterdir()
        if path.is_dir()
        and not path.name.startswith((".", "_"))
        and (
            any(path.glob("*.py")) or path.name in ("docs", "notebooks", "labextension")
        )
    }
    assert folders - named == set(), sorted(folders - named)


def test_layout_names_every_subpackage_of_dispynb() -> None:
    named = set(re.findall(r"(?m)^  ([\w]+)/", _layout()))
    packages = {p.parent.name for p in (ROOT / "dispynb").glob("*/__init__.py")}
    assert packages - named == set(), sorted(packages - named)


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    return [
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    ]


def test_layout_names_every_command_of_dispynb() -> None:
    line = re.search(r"(?m)^  cli\.py .*$", _layout())
    assert line, "cli.py is not in the layout"
    missing = [c for c in _commands(build_parser()) if c not in line.group(0)]
    assert not missing, f"cli.py's line lacks {missing}: {line.group(0)!r}"
