"""docs/security.md's attack table lists exactly the attacks of this suite."""

from __future__ import annotations

import pytest

from tests.hostile import suite


def test_security_doc_lists_every_attack(updating_doc: bool) -> None:
    attacks = suite.scan_attacks()
    assert attacks, "the hostile suite declares no attack"
    if updating_doc:
        pytest.skip(
            f"{suite.UPDATE_ENV}=1: the table is rewritten at the end of the run"
        )
    documented = [row.attack for row in suite.read_rows(suite.DOC.read_text())]
    if documented == attacks:
        return
    by_id = {attack.id: attack for attack in documented}
    problems = []
    for attack in attacks:
        if attack.id not in by_id:
            problems.append(f"missing: {attack.id}")
        elif by_id[attack.id] != attack:
            problems.append(f"title or goal changed: {attack.id}")
    declared = {attack.id for attack in attacks}
    problems += [f"no such attack: {a.id}" for a in documented if a.id not in declared]
    problems = problems or ["rows out of order"]
    pytest.fail(
        "docs/security.md's attack table is stale ("
        + "; ".join(problems)
        + f"): run `{suite.UPDATE_ENV}=1 pytest tests/hostile` "
        "(or `./dev security-doc`)"
    )


def _attack(n: int) -> suite.Attack:
    return suite.Attack(f"attack-{n}", f"title {n} | pipe", f"goal {n}")


def test_table_round_trips_with_pipes_and_newlines() -> None:
    rows = [
        suite.Row(_attack(1), "cpu 1.0% |\nsecond line", suite.HELD),
        suite.Row(_attack(2), suite.NOT_MEASURED, suite.NOT_RUN),
    ]
    text = f"intro\n{suite.TABLE_START}\nold\n{suite.TABLE_END}\nrest\n"
    new = suite.replace_table(text, rows)
    assert new.startswith("intro\n") and new.endswith(f"{suite.TABLE_END}\nrest\n")
    back = suite.read_rows(new)
    assert [row.attack for row in back] == [_attack(1), _attack(2)]
    assert back[0].measured == "cpu 1.0% | second line"
    assert suite.read_rows(suite.replace_table(new, back)) == back


def test_fresh_rows_take_this_runs_figures_and_keep_the_others() -> None:
    old = [
        suite.Row(_attack(1), "old figure 1", suite.HELD),
        suite.Row(_attack(2), "old figure 2", suite.HELD),
    ]
    outcomes = {
        "attack-1": suite.Outcome(["new figure", "new figure", "other"], passed=2),
        "attack-2": suite.Outcome([]),  # selected but skipped
        "attack-3": suite.Outcome(["cpu 90%"], passed=1, failed=1),
    }
    attacks = [_attack(1), _attack(2), _attack(3), _attack(4)]
    rows = suite.fresh_rows(attacks, old, outcomes)
    assert [(r.measured, r.held) for r in rows] == [
        ("new figure; other", suite.HELD),
        ("old figure 2", suite.HELD),
        ("cpu 90%", suite.NOT_HELD),
        (suite.NOT_MEASURED, suite.NOT_RUN),
    ]


@pytest.mark.parametrize(
    ("mark", "words"),
    [
        (pytest.mark.attack(id="x", title="t"), "keywords only"),
        (pytest.mark.attack("x", title="t", goal="g"), "keywords only"),
        (pytest.mark.attack(id="Not_Kebab", title="t", goal="g"), "kebab-case"),
        (pytest.mark.attack(id="x", title="", goal="g"), "non-empty"),
        (
            pytest.mark.attack(id="x", title="t", goal="two\nlines"),
            "one non-empty line",
        ),
    ],
)
def test_malformed_attack_marks_are_refused(mark, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        suite.attack_of([mark.mark], "here")


def test_malformed_table_is_refused() -> None:
    with pytest.raises(ValueError, match="no attack table"):
        suite.read_rows("no markers here")
    row = "| just | three | cells |"
    text = f"{suite.TABLE_START}\n{suite.HEADER}\n{row}\n{suite.TABLE_END}"
    with pytest.raises(ValueError, match="malformed"):
        suite.read_rows(text)
