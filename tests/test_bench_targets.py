"""Tests of issue 16's and 17's targets (``bench/targets.py``) and of the
hand-written notes kept across a regeneration of the report (``bench/notes/``,
``markdown.NOTES``), on synthetic documents."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_bench import _fake_result
from tests.test_bench_crosshost import _crosshost

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import markdown  # noqa: E402
import report  # noqa: E402
import targets  # noqa: E402


def _result(scale: float, cold: list[float], shared: float) -> dict[str, Any]:
    result = _fake_result(scale)
    result["runs"]["bandwidth_cold"] = cold
    result["runs"]["shared_object"] = [shared] * 3
    return result


def _document(
    scheduler: float | None, cold: list[float], shared: float, w4: float | None
) -> dict[str, Any]:
    """dispynb (2.0), ppe (3.0), dispy (0.5), ray and dask (1.0), and the scheduler
    row at ``scheduler`` (W1 = 1000 x it jobs/s, W2 = 1 / it ms) when given."""
    results = {
        "dispynb": _result(2.0, cold, shared),
        "ray": _result(1.0, [100.0] * 3, 60.0),
        "dask": _result(1.0, [80.0] * 3, 10.0),
        "dispy": _fake_result(0.5),
        "ppe": _fake_result(3.0),
    }
    if scheduler is not None:
        results["dispynb-scheduler"] = _fake_result(scheduler)
    return report.build_report(
        results=results,
        config={"workers": 2, "repeat": 3, "command": "bench/run.py"},
        crosshost=_crosshost(w4, 1000.0) if w4 is not None else None,
        machine={"nproc": 2, "python": "3.11.7", "commit": "abc"},
    )


def _by_target(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in targets.evaluate_issue_targets(document)}


W1_SCHED = "W1 through the scheduler >= 0.7x direct"
W2_SCHED = "W2 median through the scheduler minus direct <= +0.3 ms"
W1_PPE = "W1 >= 1.0x ProcessPoolExecutor"
W2_PPE = "W2 median <= 2x ProcessPoolExecutor's"
COLD = "W4 cold >= 2x Ray in every repetition"
CROSS = "cross-host W4 >= 0.8x raw TCP"
W7 = "W7 shared object <= the faster of Ray (ray.put) and Dask (scatter)"
PSS = "node PSS after W1 <= dispy's"


def test_issue_targets_pass() -> None:
    """Every target met: verdicts, ratios and references from the run's numbers."""
    rows = _by_target(_document(1.6, [250.0, 210.0, 300.0], 5.0, 900.0))
    assert {t: rows[t]["status"] for t in rows if t not in (W1_PPE, PSS)} == {
        t: "PASS" for t in (W1_SCHED, W2_SCHED, W2_PPE, COLD, CROSS, W7)
    }
    # W1 1,600 jobs/s through the scheduler against 0.7 x 2,000 direct.
    assert rows[W1_SCHED]["ratio"] == pytest.approx(1600 / 1400)
    # W2 hop: 1 / 1.6 - 1 / 2 ms = 0.125 ms.
    assert rows[W2_SCHED]["value"] == pytest.approx(0.125)
    assert rows[W2_SCHED]["reference"] == "scheduler 0.625 - direct 0.500"
    assert rows[W2_PPE]["limit"] == pytest.approx(2 / 3)
    # W4 cold: the slowest repetition (210) against 2 x ray's median (100).
    assert rows[COLD]["value"] == 210.0 and rows[COLD]["limit"] == 200.0
    assert "2.50, 2.10, 3.00" in rows[COLD]["reference"]
    assert rows[CROSS]["ratio"] == pytest.approx(900 / 800)
    # W7 against the faster peer (Dask 10 s).
    assert rows[W7]["limit"] == 10.0 and rows[W7]["reference"] == "dask (10.00)"


def test_issue_targets_miss() -> None:
    """Every target missed where the numbers say so; a MISS is never hidden."""
    rows = _by_target(_document(1.0, [250.0, 150.0, 300.0], 20.0, 400.0))
    assert {t: r["status"] for t, r in rows.items()} == {
        t: "MISS" for t in (W1_SCHED, W2_SCHED, W1_PPE, COLD, CROSS, W7, PSS)
    } | {W2_PPE: "PASS"}
    assert rows[W1_SCHED]["ratio"] == pytest.approx(1000 / 1400)
    assert rows[W2_SCHED]["value"] == pytest.approx(0.5)
    assert rows[W1_PPE]["ratio"] == pytest.approx(2000 / 3000)
    assert rows[COLD]["value"] == 150.0  # one slow repetition decides
    assert rows[PSS]["value"] == pytest.approx(2.0)
    assert rows[PSS]["limit"] == pytest.approx(0.5)
    text = markdown.render_markdown(_document(1.0, [150.0] * 3, 20.0, 400.0), {})
    section = text[text.index(markdown.ISSUE_TARGETS_HEADING) :]
    assert f"| 16 | {W1_SCHED} | 1,000 jobs/s | 1,400 jobs/s |" in section
    assert "| 0.71 | **MISS** |" in section


def test_issue_targets_not_measured() -> None:
    """Without the scheduler row, the cross-host run, W4 cold and W7: no verdict."""
    document = _document(None, [250.0] * 3, 5.0, None)
    for key in ("bandwidth_cold", "shared_object"):
        del document["metrics"][key]
    rows = _by_target(document)
    for name in (W1_SCHED, W2_SCHED, COLD, CROSS, W7):
        assert rows[name]["status"] == targets.NOT_MEASURED
        assert rows[name]["value"] is None and rows[name]["ratio"] is None
    assert rows[W1_PPE]["status"] == "MISS" and rows[W2_PPE]["status"] == "PASS"
    text = markdown.render_markdown(document, {})
    assert f"| 16 | {W1_SCHED} | - | - |" in text
    assert "| - | not measured in this run |" in text


def _notes() -> list[tuple[str, str]]:
    """(text, place) of every notes file."""
    return [
        ((BENCH / "notes" / name).read_text(encoding="utf-8").rstrip(), place or "")
        for name, place in markdown.NOTES
    ]


def test_every_notes_file_is_placed() -> None:
    """A notes file that ``markdown.NOTES`` does not list would silently drop out
    of the report: every file is listed, every listed file exists."""
    on_disk = {p.name for p in (BENCH / "notes").glob("*.md")}
    listed = [name for name, _ in markdown.NOTES]
    assert sorted(listed) == sorted(on_disk) and len(set(listed)) == len(listed)
    places = {place for _, place in markdown.NOTES}
    assert places == {None, markdown.ENGINES_HEADING, markdown.CROSSHOST_HEADING}


@pytest.mark.parametrize("measured", [False, True])
def test_rendering_keeps_every_notes_section_in_order(measured: bool) -> None:
    """Each notes file's whole text is in the report once, in `NOTES` order, inside
    its section (after the generated lines, before the next ``## ``), whether or not
    the run measured that section; a splice of a partial run keeps them too."""
    document = _document(1.6, [250.0] * 3, 5.0, 900.0 if measured else None)
    if measured:
        document["metrics"]["throughput"]["results"]["dispynb-ray"] = document[
            "metrics"
        ]["throughput"]["results"]["ray"]
    text = markdown.render_markdown(document, {})
    starts = []
    for note, place in _notes():
        assert text.count(note) == 1
        start = text.index(note)
        starts.append(start)
        if place:
            heading = text.index(place + "\n")
            between = text[heading + len(place) : start]
            assert heading < start and "\n## " not in between
            if not measured and place == markdown.CROSSHOST_HEADING:
                assert markdown.ABSENT in between
    assert starts == sorted(starts)
    assert text.index(markdown.ISSUE_TARGETS_HEADING) < text.index("## W6")
    # A cross-host run spliced into the report replaces the generated part only.
    spliced = markdown.splice(text, _document(None, [1.0] * 3, 5.0, 400.0))
    for note, _ in _notes():
        assert spliced.count(note) == 1
    assert "| W4 / raw TCP, veth | 0.40, 0.44, 0.36 | 0.40 |" in spliced
    assert markdown.splice(spliced, _document(None, [1.0] * 3, 5.0, 400.0)) == spliced
