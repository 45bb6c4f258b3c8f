"""`dispynb.wording`: counts said in the right number, where admins read them."""

from __future__ import annotations

from types import SimpleNamespace

from dispynb.wording import counted
from schedserver.clients import _Clients


def test_one_is_singular_and_the_others_plural() -> None:
    assert [counted(n, "CPU") for n in (0, 1, 2)] == ["0 CPUs", "1 CPU", "2 CPUs"]
    assert counted(2, "process", "processes") == "2 processes"


def test_a_scheduler_quota_of_one_session_says_one_session() -> None:
    """``--max_sessions 1`` refused a second cluster saying 'has 1 sessions open'."""
    server = SimpleNamespace(
        config=SimpleNamespace(max_sessions=1), sessions=[SimpleNamespace(user="al")]
    )
    said = _Clients._over_sessions(server, "al")  # type: ignore[arg-type]
    assert said.startswith("refused: user 'al' has 1 session open at the scheduler")
