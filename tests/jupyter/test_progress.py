"""Progress counts, throttling, the text bar, the widget's model state, HTML."""

from __future__ import annotations

import io
import threading

import pytest

from dispynb.jupyter import progress
from dispynb.jupyter.display import format_seconds, progress_html
from dispynb.jupyter.progress import (
    HTMLProgressBar,
    NullProgressBar,
    ProgressBar,
    ProgressCounts,
    TextProgressBar,
    WidgetProgressBar,
    make_progress,
    resolve_kind,
)

WAIT = 5.0


def test_counts_queued_rate_eta():
    counts = ProgressCounts(
        total=10, finished=3, failed=1, cancelled=0, running=2, elapsed=2.0
    )

    assert counts.ended == 4
    assert counts.queued == 4
    assert counts.rate == pytest.approx(2.0)
    assert counts.eta == pytest.approx(3.0)
    assert not counts.complete


def test_cancelled_jobs_are_no_throughput():
    counts = ProgressCounts(total=40, cancelled=40, elapsed=0.5)

    assert counts.rate == 0.0


def test_counts_before_any_end_have_no_rate_or_eta():
    counts = ProgressCounts(total=5, running=1, elapsed=1.0)

    assert counts.rate == 0.0
    assert counts.eta is None


def test_counts_complete_eta_zero():
    assert ProgressCounts(total=2, finished=1, cancelled=1, elapsed=1.0).eta == 0.0


class Recorder(ProgressBar):
    def __init__(self, interval: float) -> None:
        super().__init__("t", interval)
        self.drawn: list[ProgressCounts] = []
        self.done: list[ProgressCounts] = []
        self.drew = threading.Event()

    def _draw_bar(self, counts: ProgressCounts) -> None:
        self.drawn.append(counts)
        self.drew.set()

    def _draw_done(self, counts: ProgressCounts) -> None:
        self.done.append(counts)


def test_bar_update_throttled_then_trailing_draw_shows_last_state():
    # An interval far longer than the 50 updates take, even on a loaded machine
    # (at 0.05 s the trailing draw once came in the middle of them, in CI).
    bar = Recorder(interval=1.0)
    for finished in range(1, 51):
        bar.update(ProgressCounts(total=50, finished=finished))

    assert len(bar.drawn) == 1  # the first update draws, the rest wait
    bar.drew.clear()
    assert bar.drew.wait(WAIT)  # the trailing redraw
    assert bar.drawn[-1].finished == 50
    assert len(bar.drawn) == 2


def test_bar_finish_draws_once_and_ignores_later_updates():
    bar = Recorder(interval=60)
    bar.update(ProgressCounts(total=2))
    bar.update(ProgressCounts(total=2, finished=1))  # throttled: timer pending
    bar.finish(ProgressCounts(total=2, finished=2))
    bar.finish(ProgressCounts(total=2, finished=1))
    bar.update(ProgressCounts(total=2, finished=1), force=True)

    assert [c.finished for c in bar.done] == [2]
    assert len(bar.drawn) == 1
    assert bar._timer is None


def test_text_bar_rewrites_one_line_and_ends_it():
    stream = io.StringIO()
    bar = TextProgressBar("sq", interval=0, stream=stream, width=10)

    bar.update(ProgressCounts(total=4, finished=1, running=2, elapsed=1.0))
    bar.before_output()
    bar.finish(ProgressCounts(total=4, finished=3, failed=1, elapsed=2.0))

    text = stream.getvalue()
    assert text.startswith("\rsq [##--------] 1/4 done, 2 running, 1 queued")
    assert " " * 40 + "\r" in text  # the line is cleared before other output
    assert text.endswith(
        "\rsq [##########] 3/4 done, 1 failed, 0 running, 0 queued, 2 jobs/s, in 0:02\n"
    )


def test_text_bar_outside_a_kernel_draws_on_stderr_as_tqdm(capsys):
    """A script's stdout (piped to a file) stays clean; the bar shows on the
    terminal. In a kernel it goes to stdout (tests/jupyter/test_kernel_cells)."""
    bar = TextProgressBar("sq", interval=0, width=10)

    bar.finish(ProgressCounts(total=1, finished=1, elapsed=1.0))

    drawn = capsys.readouterr()
    assert drawn.out == ""
    assert "sq [##########] 1/1 done" in drawn.err


def _as_shown(text: str) -> list[str]:
    """``text``'s lines as a terminal (or a notebook's stream) shows them: ``\r``
    moves back to the line's start, and what follows overwrites it."""
    lines = []
    for raw in text.split("\n"):
        shown = ""
        for part in raw.split("\r"):
            shown = part + shown[len(part) :]
        lines.append(shown.rstrip())
    return lines


def test_text_bar_leaves_nothing_of_a_longer_line_drawn_before():
    """The last line was shorter than the one before ('ETA 0:01' then 'in 0:00'):
    it showed 'in 0:000', the end of the longer one left behind."""
    stream = io.StringIO()
    bar = TextProgressBar("sq", interval=0, stream=stream, width=10)

    bar.update(ProgressCounts(total=40, finished=1, running=2, elapsed=1.0))
    bar.finish(ProgressCounts(total=4, finished=4, elapsed=0.2))

    assert _as_shown(stream.getvalue()) == [
        "sq [##########] 4/4 done, 0 running, 0 queued, 20 jobs/s, in 0:00",
        "",
    ]


def test_widget_bar_model_state_follows_counts():
    bar = WidgetProgressBar("run")

    bar.update(ProgressCounts(total=8, finished=2, failed=1, running=3, elapsed=1.0))

    assert (bar.bar.value, bar.bar.max, bar.bar.bar_style) == (3, 8, "")
    assert "2/8 done, 1 failed, 3 running, 2 queued" in bar.label.value
    assert "ETA" in bar.label.value

    bar.finish(ProgressCounts(total=8, finished=7, failed=1, elapsed=2.0))

    assert (bar.bar.value, bar.bar.bar_style) == (8, "danger")


@pytest.mark.parametrize(
    ("counts", "style"),
    [
        (ProgressCounts(total=2, finished=2), "success"),
        (ProgressCounts(total=2, finished=1, cancelled=1), "warning"),
        (ProgressCounts(total=2, finished=1, failed=1), "danger"),
    ],
)
def test_widget_bar_final_style(counts, style):
    bar = WidgetProgressBar()
    bar.finish(counts)
    assert bar.bar.bar_style == style


def test_finished_bars_keep_their_widgets_open_for_the_last_runs_only(monkeypatch):
    """A finished run's widgets stay open (a page reloaded meanwhile shows them from
    the kernel), those of the last `KEPT_OPEN` runs only: a page's load fetches
    every open widget, and runs in a loop would pile them up."""
    monkeypatch.setattr(progress, "KEPT_OPEN", 3, raising=False)
    monkeypatch.setattr(progress, "_kept", [], raising=False)
    bars = []
    for _ in range(5):
        bar = WidgetProgressBar("run")
        bar.outputs.append(progress.WidgetOutput())
        bar.finish(ProgressCounts(total=1, finished=1))
        bars.append(bar)
    opened = [bar.widget.comm is not None for bar in bars]
    outputs = [bar.outputs[0].widget.comm is not None for bar in bars]
    assert opened == outputs == [False, False, True, True, True]
    assert bars[-1].bar.comm is not None and bars[0].bar.comm is None


def test_widget_bar_display_bundle_has_widget_and_static_html():
    bar = WidgetProgressBar("run")
    bar.update(ProgressCounts(total=2, finished=1), force=True)

    bundle = progress._WidgetWithSnapshot(bar)._repr_mimebundle_()

    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "1/2 done" in bundle["text/html"]
    assert bundle["text/plain"].startswith("run: 1/2 done")


def test_progress_html_segments_and_escaping():
    html = progress_html(ProgressCounts(total=4, finished=2, failed=1), "<x>")

    assert "&lt;x&gt;" in html and "<x>" not in html
    assert 'title="finished" style="width:50.00%' in html
    assert 'title="failed" style="width:25.00%' in html
    assert "2/4 done, 1 failed" in html


def test_format_seconds():
    assert format_seconds(None) == "?"
    assert format_seconds(4.4) == "0:04"
    assert format_seconds(3723) == "1:02:03"


def test_resolve_kind_outside_a_kernel(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    assert resolve_kind("auto") in ("text", "none")
    assert resolve_kind("html") == "html"
    with pytest.raises(ValueError, match="progress must be one of"):
        resolve_kind("fancy")


def test_resolve_kind_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv(progress.PROGRESS_ENV, "html")
    assert resolve_kind("auto") == "html"
    assert resolve_kind("text") == "text"


def test_a_misspelt_environment_kind_is_named_not_ignored(monkeypatch):
    """``DISPYNB_PROGRESS=htm`` was ignored without a word: every run drew widgets
    (or nothing), and nothing said why the setting did not take."""
    monkeypatch.setenv(progress.PROGRESS_ENV, "htm")
    with pytest.raises(ValueError) as raised:
        resolve_kind("auto")
    assert str(raised.value) == (
        "DISPYNB_PROGRESS='htm': use one of auto, widget, html, text or none "
        "(or unset it)"
    )
    assert resolve_kind("text") == "text"  # only "auto" reads it
    monkeypatch.setenv(progress.PROGRESS_ENV, " ")
    assert resolve_kind("auto") in ("text", "none")


def test_make_progress_kinds():
    assert isinstance(make_progress("widget"), WidgetProgressBar)
    assert isinstance(make_progress("html"), HTMLProgressBar)
    assert isinstance(make_progress("text"), TextProgressBar)
    assert isinstance(make_progress("none"), NullProgressBar)


def test_bar_redraws_when_counts_change_and_when_only_time_passes_rarely(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run whose jobs all run long: the time alone (its rate and ETA) redraws
    every CLOCK_INTERVAL seconds, not at every update (4 a second while waiting)."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    bar = Recorder(interval=0)
    for second in range(30):
        now[0] = 1000.0 + second
        bar.update(ProgressCounts(total=4, finished=2, running=2, elapsed=second))
    assert [c.elapsed for c in bar.drawn] == [0, 10, 20]
    bar.update(ProgressCounts(total=4, finished=3, running=1, elapsed=29.5))
    assert bar.drawn[-1].finished == 3
