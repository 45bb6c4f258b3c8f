"""The hostile suite: every attack on dispynb tried, run for real, with its figure.

How to write an attack test (see README.md next to this file)::

    @pytest.mark.slow  # if it starts node subprocesses
    @pytest.mark.attack(
        id="fd-exhaustion",
        title="1,000 connections held against a node at its fd limit",
        goal="node CPU under 5%, one log line per episode, service back",
    )
    def test_fd_exhaustion(measure, tmp_path):
        ...  # run the attack for real, bounded in time
        measure(f"node CPU {cpu:.1f}%, {lines} log lines, back in {back:.1f} s")
        assert cpu < 5 and lines <= 2

`measure(text)` records what the test measured (call it before the assertions, so a
failing run still shows the figure); a passing attack test that measured nothing fails.
``DISPYNB_UPDATE_SECURITY_DOC=1 pytest tests/hostile`` rewrites the table of
docs/security.md with this run's figures; `test_security_doc` fails whenever that table
does not list exactly the attacks declared here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator

import pytest

from tests.hostile import suite

#: Per attack id: what this run measured and how its tests ended.
OUTCOMES: dict[str, suite.Outcome] = {}

_FIGURES = pytest.StashKey[list[str]]()


def _attack(item: pytest.Item) -> suite.Attack | None:
    return suite.attack_of(item.iter_markers("attack"), item.nodeid)


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``measure(text)``: record what an attack test measured, for docs/security.md."""
    attack = _attack(request.node)
    if attack is None:
        raise pytest.UsageError(
            f"{request.node.nodeid}: `measure` is for tests marked @pytest.mark.attack"
        )
    figures = request.node.stash.setdefault(_FIGURES, [])

    def record(text: str) -> None:
        figures.append(" ".join(str(text).split()))

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    report: pytest.TestReport = (yield).get_result()  # type: ignore[attr-defined]
    attack = _attack(item)
    if attack is None:
        return
    figures = item.stash.get(_FIGURES, [])
    if report.when == "call" and report.passed and not figures:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} is an attack test: call measure('what was measured') "
            "with the figure it checks"
        )
    outcome = OUTCOMES.setdefault(attack.id, suite.Outcome([]))
    if report.failed:
        outcome.failed += 1
    elif report.when == "call" and report.passed:
        outcome.passed += 1
    if report.when == "teardown":
        outcome.figures.extend(figures)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if os.environ.get(suite.UPDATE_ENV) != "1" or hasattr(
        session.config, "workerinput"
    ):
        return
    text = suite.DOC.read_text()
    rows = suite.fresh_rows(suite.scan_attacks(), suite.read_rows(text), OUTCOMES)
    suite.DOC.write_text(suite.replace_table(text, rows))


@pytest.fixture
def updating_doc() -> Iterator[bool]:
    """True when this run rewrites docs/security.md's table."""
    yield os.environ.get(suite.UPDATE_ENV) == "1"
