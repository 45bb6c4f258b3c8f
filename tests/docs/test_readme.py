"""The README is one screen for a newcomer: its links lead somewhere, and its script
example runs as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

#: "What a newcomer needs on one screen", give or take a scroll (with how to run the
#: example and the programs once ``./dev`` has set ``.venv`` up).
MAX_LINES = 85


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_fits_on_a_screen() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_links_lead_to_files_of_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    broken = []
    for link in _links(text):
        if link.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = ROOT / link.split("#", 1)[0]
        if not path.exists():
            broken.append(link)
    assert _links(text), "the README links into the documentation"
    assert not broken, f"README links to missing files: {broken}"


def test_readme_says_where_to_import_the_classes_it_names() -> None:
    """A class the README calls in its text (``SSHNodes(hosts)``) is one of
    ``dispynb``'s, or of a module the README names: a newcomer's ``from dispynb
    import SSHNodes`` failed with only "cannot import name", the README not saying
    that it is in ``dispynb.deploy``."""
    import importlib

    import dispynb

    text = README.read_text(encoding="utf-8")
    spans = re.findall(r"`([^`\n]+)`", text)
    called = {n for span in spans for n in re.findall(r"\b([A-Z]\w+)\(", span)}
    modules = [
        importlib.import_module(name)
        for span in spans
        for name in re.findall(r"^(dispynb(?:\.\w+)+)$", span)
    ]
    unplaced = sorted(
        name
        for name in called
        if not hasattr(dispynb, name) and not any(hasattr(m, name) for m in modules)
    )
    assert called >= {"SSHNodes", "DaskEngine"}, called
    assert not unplaced, f"README names, but says not where from: {unplaced}"


def readme_script() -> str:
    """The README's script example (its Python block with ``__main__``)."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(b for b in blocks if "__main__" in b)


def _script_run() -> tuple[str, str]:
    """The README after its script: ``Saved as `F`, `python F` prints `OUT```."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"Saved as `([\w.]+)`, `python \1` prints `([^`]+)`", text)
    assert found, "the README says how to run its script example, and what it prints"
    return found[1], found[2]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_readme_script_example_runs(tmp_path: Path) -> None:
    """The script example, saved and run as the README says, prints what it says
    (``...`` standing for the numbers left out)."""
    name, printed = _script_run()
    path = tmp_path / name
    path.write_text(readme_script(), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    expected = ".*".join(map(re.escape, printed.split("...")))
    assert re.fullmatch(expected, done.stdout.strip()), (printed, done.stdout)


def test_readme_programs_on_path_are_in_the_venv() -> None:
    """``source .venv/bin/activate`` puts the programs the README names on ``PATH``:
    each is in the venv ``./dev`` sets up (the one running the tests), so a newcomer
    who types them after the two commands finds them."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    found = re.search(r"source \.venv/bin/activate` puts (.*?) on your `PATH`", text)
    assert found, "the README says how to reach the programs ./dev installs"
    names = re.findall(r"`([^`]+)`", found[1])
    assert "dispynb-node" in names
    bindir = Path(sys.executable).parent
    # `jupyter lab` runs the program jupyter-lab, as git's subcommands do
    missing = [n for n in names if not (bindir / n.replace(" ", "-")).exists()]
    assert not missing, f"not in {bindir}: {missing}"


def test_readme_lists_every_guide_and_explanation() -> None:
    """Its "Documentation" paragraph says "Its pages:": each how-to and explanation
    page is there, so a newcomer reading only the README finds them all."""
    text = README.read_text(encoding="utf-8")
    linked = {ROOT / link.split("#", 1)[0] for link in _links(text)}
    pages = [
        ROOT / "docs" / "getting-started.md",
        ROOT / "docs" / "security.md",
        ROOT / "docs" / "benchmarks.md",
        *sorted((ROOT / "docs" / "howto").glob("*.md")),
        *sorted((ROOT / "docs" / "explanation").glob("*.md")),
    ]
    missing = [str(page.relative_to(ROOT)) for page in pages if page not in linked]
    assert not missing, f"README.md does not link {missing}"
