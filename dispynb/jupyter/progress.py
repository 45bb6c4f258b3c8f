"""Progress of a set of jobs: counts, rate and ETA, drawn as a widget, HTML or text.

`ProgressCounts` is a snapshot (pure data). Bars draw snapshots and share one base
class, `ProgressBar`, whose `~ProgressBar.update` is throttled (one redraw per
``interval`` seconds at most, plus a trailing redraw so the last state always shows)
and safe to call from the cluster's callback thread. A bar redraws when the counts
change; when only time passes (the rate and ETA drift) at most every
`CLOCK_INTERVAL` seconds: a kernel's output is kept by the Jupyter server for a
notebook whose tab is closed, so a long run must not send a steady stream of
redraws that say nothing new.

- `WidgetProgressBar`: an ipywidgets bar and label inside a kernel; its display also
  carries a static ``text/html`` snapshot for front ends without widgets (nbviewer,
  GitHub), and becomes that snapshot alone when the run ends: a notebook saved and
  opened again has no widget models (JupyterLab said "Error displaying widget: model
  not found" in place of every bar); `WidgetOutput` does the same for a ``--nowait``
  run's output;
- `HTMLProgressBar`: only the ``text/html`` snapshot, updated in place (``display_id``);
- `TextProgressBar`: one line rewritten with ``\\r`` on a stream (stderr in a
  terminal, stdout in a kernel);
- `NullProgressBar`: draws nothing.

`make_progress` picks one: ``"auto"`` is a widget in a kernel with ipywidgets, HTML in a
kernel without, text on a terminal and nothing otherwise. The ``DISPYNB_PROGRESS``
environment variable (``widget``, ``html``, ``text`` or ``none``) overrides ``"auto"``,
e.g. for documentation builds; another value is refused (`ValueError`), not ignored.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from dispynb._interruptible import start_thread, try_start_thread
from dispynb.jupyter import display as templates

__all__ = [
    "HTMLOutput",
    "HTMLProgressBar",
    "NullProgressBar",
    "ProgressBar",
    "ProgressCounts",
    "TextProgressBar",
    "WidgetOutput",
    "WidgetProgressBar",
    "make_progress",
]

#: Environment variable overriding the ``"auto"`` choice of progress display.
PROGRESS_ENV = "DISPYNB_PROGRESS"

KINDS = ("auto", "widget", "html", "text", "none")

#: Seconds between two redraws when only the elapsed time changed (the rate and
#: ETA it moves): a run whose jobs all run long redraws this rarely.
CLOCK_INTERVAL = 10.0

#: Positions of the widget's bar. A move of less than one (under a pixel however
#: wide a notebook draws it) is not sent: 35 jobs of 100,000 ended between two
#: redraws would send a message that changes nothing on the screen.
BAR_STEPS = 500
#: Finished runs whose widgets stay open for a page reloaded meanwhile
#: (`WidgetProgressBar`); older ones are closed, so that a page's load does not fetch
#: every widget the kernel ever drew (runs in a loop).
KEPT_OPEN = 20


@dataclasses.dataclass(frozen=True)
class ProgressCounts:
    """A snapshot of a set of jobs.

    Attributes
    ----------
    total:
        Jobs submitted.
    finished:
        Jobs that returned a result (status ``Finished``).
    failed:
        Jobs that raised or crashed (``Terminated``) or were given up (``Abandoned``).
    cancelled:
        Jobs cancelled before they ran (``Cancelled``), and running jobs a run's Stop
        or Cancel ended (``Terminated``: not failures).
    running:
        Jobs started on a node and not ended.
    elapsed:
        Seconds since the first job was submitted.
    provisional:
        Provisional results received (``dispy_provisional_result``); a job that
        sends them is still running, not done.
    latest:
        The latest provisional result, as short text (``"input 3: 0.75"``).
    """

    total: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0
    elapsed: float = 0.0
    provisional: int = 0
    latest: str = ""

    @property
    def ended(self) -> int:
        """Jobs in a final status."""
        return self.finished + self.failed + self.cancelled

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet started."""
        return max(self.total - self.ended - self.running, 0)

    @property
    def complete(self) -> bool:
        """Whether every job has ended."""
        return self.ended >= self.total

    @property
    def rate(self) -> float:
        """Jobs that ran (finished or failed) per second so far; 0.0 before the
        first one ends. Cancelled jobs did not run: they are no throughput."""
        ran = self.finished + self.failed
        if not ran or self.elapsed <= 0:
            return 0.0
        return ran / self.elapsed

    @property
    def eta(self) -> float | None:
        """Seconds until every job has ended at the current rate; None if unknown."""
        if self.complete:
            return 0.0
        rate = self.rate
        return (self.total - self.ended) / rate if rate else None


class ProgressBar(abc.ABC):
    """Base class: throttled drawing of `ProgressCounts` snapshots.

    Subclasses implement `_draw_bar` (a state in progress) and `_draw_done` (the final
    state), and may override `show`. Draws are serialized by a lock, so `update` may be
    called from any thread.

    Parameters
    ----------
    title:
        Shown before the counts.
    interval:
        Minimum seconds between two redraws.
    """

    def __init__(self, title: str = "", interval: float = 0.2) -> None:
        self.title = title
        self.interval = interval
        self.counts = ProgressCounts()
        self.closed = False
        self._lock = threading.RLock()
        self._last_draw = float("-inf")
        self._shown: ProgressCounts | None = None  # what the last draw showed
        self._timer: threading.Timer | None = None

    def show(self) -> None:  # noqa: B027 (optional hook: a no-op by default)
        """Display the bar in the current cell (or start the text line)."""

    def before_output(self) -> None:  # noqa: B027 (optional hook, as show)
        """Called before other text is written where the bar draws (text bars)."""

    def update(self, counts: ProgressCounts, force: bool = False) -> None:
        """Record ``counts``; redraw now, or within ``interval`` seconds (if only
        the elapsed time changed: once `CLOCK_INTERVAL` seconds have passed)."""
        with self._lock:
            if self.closed:
                return
            self.counts = counts
            now = time.monotonic()
            if not force and not self._changed(counts, now):
                return
            wait = self._last_draw + self.interval - now
            if force or wait <= 0:
                self._draw_now()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._trailing)
                self._timer.daemon = True
                if not try_start_thread(self._timer):  # at exit: drawn now
                    self._timer = None
                    self._draw_now()

    def finish(self, counts: ProgressCounts) -> None:
        """Draw the final state once; later updates are ignored."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.counts = counts
            self._cancel_timer()
            self._draw_done(counts)

    def _changed(self, counts: ProgressCounts, now: float) -> bool:
        """Whether ``counts`` is worth a redraw: a count changed, or only time
        passed and the last draw is `CLOCK_INTERVAL` seconds old."""
        drawn = self._shown
        if drawn is None or counts != dataclasses.replace(
            drawn, elapsed=counts.elapsed
        ):
            return True
        return now - self._last_draw >= CLOCK_INTERVAL

    def _trailing(self) -> None:
        with self._lock:
            self._timer = None
            if not self.closed:
                self._draw_now()

    def _draw_now(self) -> None:
        self._cancel_timer()
        self._last_draw = time.monotonic()
        self._shown = self.counts
        self._draw_bar(self.counts)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @abc.abstractmethod
    def _draw_bar(self, counts: ProgressCounts) -> None:
        """Show ``counts`` (a state in progress)."""

    def _draw_done(self, counts: ProgressCounts) -> None:
        self._draw_bar(counts)

    def text(self) -> str:
        """The current state as one line of text."""
        prefix = f"{self.title}: " if self.title else ""
        return prefix + templates.format_counts(self.counts)

    def _repr_html_(self) -> str:
        return templates.progress_html(self.counts, self.title)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.text()}>"


class NullProgressBar(ProgressBar):
    """Keeps the counts, draws nothing."""

    def _draw_bar(self, counts: ProgressCounts) -> None:
        pass


class TextProgressBar(ProgressBar):
    """``[#####-----] 45/100 done, ...`` rewritten in place on ``stream``.

    Parameters
    ----------
    stream:
        Where to write; default, at draw time, ``sys.stderr`` in a terminal (as
        tqdm: a script's piped stdout stays clean) and ``sys.stdout`` in a Jupyter
        kernel, whose front ends style stderr as an error (a pink box).
    width:
        Characters of the bar itself.
    """

    def __init__(
        self,
        title: str = "",
        interval: float = 0.2,
        stream: IO[str] | None = None,
        width: int = 30,
    ) -> None:
        super().__init__(title, interval)
        self._stream = stream
        self._in_kernel = in_kernel()
        self.width = width
        self._drawn = 0  # length of the line on screen, to clear it

    def line(self, counts: ProgressCounts | None = None) -> str:
        counts = counts or self.counts
        filled = int(self.width * counts.ended / max(counts.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        prefix = f"{self.title} " if self.title else ""
        return f"{prefix}[{bar}] {templates.format_counts(counts)}"

    def _write(self, text: str) -> None:
        stream = self._stream or (sys.stdout if self._in_kernel else sys.stderr)
        stream.write(text)
        stream.flush()

    def before_output(self) -> None:
        with self._lock:
            if self._drawn:
                self._write("\r" + " " * self._drawn + "\r")
                self._drawn = 0

    def _draw_bar(self, counts: ProgressCounts) -> None:
        line = self.line(counts)
        # Padded over the line drawn before: ``\r`` only moves back (a terminal,
        # and a notebook's stream alike, keep the end of a longer line).
        self._write("\r" + line.ljust(self._drawn))
        self._drawn = len(line)

    def _draw_done(self, counts: ProgressCounts) -> None:
        self._write("\r" + self.line(counts).ljust(self._drawn) + "\n")
        self._drawn = 0


class HTMLProgressBar(ProgressBar):
    """A static HTML snapshot displayed with a ``display_id`` and updated in place."""

    def __init__(self, title: str = "", interval: float = 0.5) -> None:
        super().__init__(title, interval)
        self._handle: Any = None
        #: Output areas given their final state with the bar's.
        self.outputs: list[HTMLOutput] = []

    def show(self) -> None:
        from IPython.display import display

        if self._handle is None:
            self._handle = display(self._bundle(), raw=True, display_id=True)

    def _bundle(self) -> dict[str, str]:
        return {"text/html": self._repr_html_(), "text/plain": self.text()}

    def _draw_bar(self, counts: ProgressCounts) -> None:
        if self._handle is not None:
            self._handle.update(self._bundle(), raw=True)

    def _draw_done(self, counts: ProgressCounts) -> None:
        self._draw_bar(counts)
        for output in self.outputs:
            output.freeze()


class WidgetProgressBar(ProgressBar):
    """An ipywidgets bar (``IntProgress``) and label (``HTML``) in an ``HBox``.

    The model state is the API tests and front ends see: ``bar.value`` (jobs ended,
    kept to `BAR_STEPS` positions while the run goes on: it moves when the bar
    would move on the screen; exact once it ends), ``bar.max`` (jobs submitted),
    ``bar.bar_style`` (``""`` while running, then ``"success"``, ``"danger"`` if
    any failed or ``"warning"`` if any was cancelled), and ``label.value`` (the
    counts as text, exact at every redraw).
    """

    def __init__(self, title: str = "", interval: float = 0.5) -> None:
        super().__init__(title, interval)
        import ipywidgets

        self.bar = ipywidgets.IntProgress(value=0, min=0, max=1, description=title)
        self.label = ipywidgets.HTML(value="")
        self.widget = ipywidgets.HBox([self.bar, self.label])
        #: Output areas made static with the bar when the run ends.
        self.outputs: list[WidgetOutput] = []
        self._handle: Any = None

    def show(self) -> None:
        from IPython.display import display

        if self._handle is None:
            self._handle = display(_WidgetWithSnapshot(self), display_id=True)

    def _draw_bar(self, counts: ProgressCounts, exact: bool = False) -> None:
        bar, total = self.bar, max(counts.total, 1)
        if (
            exact
            or total != bar.max
            or _step(counts.ended, total) != _step(bar.value, total)
        ):
            with bar.hold_sync():  # max and value in one message
                bar.max = total
                bar.value = counts.ended
        self.label.value = templates.format_counts(counts)

    def _draw_done(self, counts: ProgressCounts) -> None:
        self._draw_bar(counts, exact=True)
        if counts.failed:
            self.bar.bar_style = "danger"
        elif counts.cancelled:
            self.bar.bar_style = "warning"
        else:
            self.bar.bar_style = "success"
        if self._handle is not None:
            # The final state as the static snapshot alone: saved with the notebook,
            # it shows when the notebook is opened again (the widget's model is
            # gone then). Only the page that ran the cell knows the display's id:
            # the widgets stay open in their final state for a page reloaded
            # meanwhile, which shows them again from the kernel.
            self._handle.update(self._snapshot(), raw=True)
        for output in self.outputs:
            output.freeze()
        with _kept_lock:
            _kept.append(self)
            old = _kept[: max(0, len(_kept) - KEPT_OPEN)]
            del _kept[: len(old)]
        for bar in old:
            bar.close()

    def close(self) -> None:
        """Close the bar's widgets and its outputs' (a page shows them no more)."""
        for widget in (self.widget, self.bar, self.label):  # (a box leaves its own)
            widget.close()
        for output in self.outputs:
            output.widget.close()

    def _snapshot(self) -> dict[str, str]:
        return {"text/html": self._repr_html_(), "text/plain": self.text()}


_kept: list[WidgetProgressBar] = []  # finished, widgets open, oldest first
_kept_lock = threading.Lock()


def _step(value: int, total: int) -> int:
    """The position of the widget's bar at ``value`` of ``total`` (`BAR_STEPS`)."""
    return value * BAR_STEPS // total


class _WrittenOutput:
    """What a run's jobs printed, as written, and its static snapshot."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, str]] = []  # (stream, text) as written
        self._lock = threading.Lock()
        self._handle: Any = None
        self._frozen = False

    def _update(self) -> None:
        if self._handle is not None:
            self._handle.update(self.snapshot(), raw=True)

    def snapshot(self) -> dict[str, str]:
        """What was written, as ``text/plain`` and (up to `SNAPSHOT_HTML` characters)
        ``text/html``."""
        plain = "".join(text for _, text in self._parts)
        if not plain or len(plain) > SNAPSHOT_HTML:
            return {"text/plain": plain}
        blocks: list[tuple[str, str]] = []  # consecutive writes of a stream joined
        for stream, text in self._parts:
            if blocks and blocks[-1][0] == stream:
                blocks[-1] = (stream, blocks[-1][1] + text)
            else:
                blocks.append((stream, text))
        return {
            "text/html": "".join(_pre(*block) for block in blocks),
            "text/plain": plain,
        }


class HTMLOutput(_WrittenOutput):
    """What a ``--nowait`` run's jobs print, shown under its `HTMLProgressBar` (no
    widgets: ``--progress html``, a kernel without ipywidgets): a display made in
    the run's cell and redrawn in place with everything written so far, at most
    every ``interval`` seconds, and once more when the run ends (`freeze`)."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.interval = interval
        self._last = float("-inf")
        self._timer: threading.Timer | None = None

    def show(self) -> None:
        """Make the display, empty, in the current cell: later writes come from
        another thread, when another cell may be running."""
        from IPython.display import display

        if self._handle is None:
            self._handle = display({"text/plain": ""}, raw=True, display_id=True)

    def write(self, stream: str, text: str) -> None:
        """Add ``text`` to ``stream`` (``"stdout"`` or ``"stderr"``)."""
        with self._lock:
            self._parts.append((stream, text))
            wait = self._last + self.interval - time.monotonic()
            if self._frozen or wait <= 0:
                self._redraw()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._trailing)
                self._timer.daemon = True
                start_thread(self._timer)

    def freeze(self) -> None:
        """Show everything written now (the run ended); later writes show at once."""
        with self._lock:
            if not self._frozen:
                self._frozen = True
                self._redraw()

    def _trailing(self) -> None:
        with self._lock:
            self._timer = None
            if not self._frozen:
                self._redraw()

    def _redraw(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last = time.monotonic()
        self._update()


class WidgetOutput(_WrittenOutput):
    """What a run's jobs print, shown under its bar while the kernel runs other cells
    (a ``--nowait`` run): an ``ipywidgets.Output`` until `freeze`, then a static
    snapshot of the same text (``<pre>`` blocks, stderr shaded as the notebook
    shades it), which a saved notebook keeps: the widget's model is not saved with
    it, and its tracebacks were lost once the notebook was opened again."""

    def __init__(self) -> None:
        import ipywidgets

        super().__init__()
        self.widget = ipywidgets.Output()

    def show(self) -> None:
        from IPython.display import display

        if self._handle is None:
            self._handle = display(self.widget, display_id=True)

    def write(self, stream: str, text: str) -> None:
        """Add ``text`` to ``stream`` (``"stdout"`` or ``"stderr"``)."""
        with self._lock:
            self._parts.append((stream, text))
            if self._frozen:  # written after the run ended (a later wait())
                self._update()
        # The widget too: a page reloaded during the run shows it (`freeze`).
        if stream == "stdout":
            self.widget.append_stdout(text)
        else:
            self.widget.append_stderr(text)

    def freeze(self) -> None:
        """Show what was written as a static snapshot, in place of the widget (in
        the page that ran the cell, which alone knows the display's id; a page
        reloaded since shows the widget, kept open, from the kernel)."""
        with self._lock:
            if self._frozen:
                return
            self._frozen = True
            self._update()


#: Characters of output above which `WidgetOutput`'s snapshot is plain text only (its
#: HTML would double the size of the one message that carries it).
SNAPSHOT_HTML = 200_000


def _pre(stream: str, text: str) -> str:
    import html

    shade = (
        "background:var(--jp-rendermime-error-background,#fdd);"
        if stream == "stderr"
        else ""
    )
    return (
        f'<pre class="dispynb-{stream}" style="{shade}margin:0;padding:1px 4px">'
        f"{html.escape(text)}</pre>"
    )


class _WidgetWithSnapshot:
    """Displays a widget together with a static HTML snapshot of the bar."""

    def __init__(self, bar: WidgetProgressBar) -> None:
        self._bar = bar

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(self._bar.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/html"] = self._bar._repr_html_()
        bundle["text/plain"] = self._bar.text()
        return bundle


def in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (not a terminal or a script)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def resolve_kind(kind: str = "auto") -> str:
    """Turn ``"auto"`` into the kind of progress display that fits here."""
    if kind not in KINDS:
        raise ValueError(f"progress must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind != "auto":
        return kind
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced and forced not in KINDS:
        raise ValueError(
            f"{PROGRESS_ENV}={os.environ[PROGRESS_ENV]!r}: use one of "
            f"{', '.join(KINDS[:-1])} or {KINDS[-1]} (or unset it)"
        )
    if forced and forced != "auto":
        return forced
    if in_kernel():
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            return "html"
        return "widget"
    isatty: Callable[[], bool] | None = getattr(sys.stderr, "isatty", None)
    return "text" if isatty is not None and isatty() else "none"


def make_progress(kind: str = "auto", title: str = "") -> ProgressBar:
    """A progress bar of ``kind`` (see the module docstring), not yet shown."""
    kind = resolve_kind(kind)
    if kind == "widget":
        return WidgetProgressBar(title)
    if kind == "html":
        return HTMLProgressBar(title)
    if kind == "text":
        return TextProgressBar(title)
    return NullProgressBar(title)
