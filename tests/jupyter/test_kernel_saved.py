"""What a notebook keeps of its runs once they ended, in a real kernel: a saved
notebook has no widget models (JupyterLab does not save them), so a display that
is still a widget then reads "Error displaying widget: model not found". A run's
bar and a ``--nowait`` run's output become static snapshots when the run ends; the
node panel is HTML redrawn in place, which the notebook saves as it last stood."""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.jupyter.kernel import CELL_TIMEOUT, Kernel, kernel

pytestmark = pytest.mark.slow

WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    with kernel(tmp_path_factory.mktemp("kernel")) as started:
        started.run_ok("%load_ext dispynb\n%dispy local --cpus 2")
        yield started


def displays(
    k: Kernel, code: str, until: int = 0, ended: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Run ``code``; each display it made (by display id) as it stands once the
    kernel is idle and, if ``until``, that many displays' final updates (those
    without a widget) came, from whatever cell they were sent under, and they say
    each of ``ended``."""
    msg_id = k.submit(code)
    shown: dict[str, dict[str, Any]] = {}
    idle = False
    deadline = time.monotonic() + CELL_TIMEOUT

    def waiting() -> bool:
        final = [d.get("text/plain", "") for d in shown.values() if WIDGET not in d]
        said = all(any(text in plain for plain in final) for text in ended)
        return not idle or len(final) < until or not said

    while waiting():
        assert time.monotonic() < deadline, shown
        try:
            msg = k.client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        kind, content = msg["msg_type"], msg["content"]
        display_id = content.get("transient", {}).get("display_id")
        if kind == "display_data" and display_id:
            if msg["parent_header"].get("msg_id") == msg_id:
                shown[display_id] = content["data"]
        elif kind == "update_display_data" and display_id in shown:
            shown[display_id] = content["data"]
        elif kind == "status" and content["execution_state"] == "idle":
            idle = idle or msg["parent_header"].get("msg_id") == msg_id
    k.client.get_shell_msg(timeout=CELL_TIMEOUT)  # the cell's reply
    return shown


def test_a_finished_runs_bar_is_a_static_snapshot_a_saved_notebook_shows(k):
    (bar,) = displays(
        k,
        '%%dispy --over "range(4)" --into mixed\n'
        "def mixed(i):\n"
        "    if i == 3:\n"
        "        raise ValueError(i)\n"
        "    return i",
    ).values()
    # Before: the widget stayed in the display (with the snapshot beside it), and a
    # notebook saved then opened again said "Error displaying widget".
    assert WIDGET not in bar, bar
    assert "3/4 done, 1 failed" in bar["text/html"], bar
    assert bar["text/plain"].startswith("mixed: 3/4 done, 1 failed"), bar


#: A ``--nowait`` run's function: two jobs that print, the second raises.
_LATER = (
    "def later(i):\n"
    "    import time\n"
    "    time.sleep(0.5)\n"
    "    print('hello from', i)\n"
    "    if i == 1:\n"
    "        raise KeyError('missing')\n"
    "    return i"
)


def _assert_later_output(output: dict[str, str]) -> None:
    """`_LATER`'s output display: both jobs' lines and the error, as text and HTML,
    its stderr styled."""
    for text in (output["text/plain"], output["text/html"]):
        assert "hello from 0" in text and "hello from 1" in text, output
        assert "KeyError: &#x27;missing&#x27;" in text or "KeyError: 'missing'" in text
    assert 'class="dispynb-stderr"' in output["text/html"], output


def test_a_nowait_runs_output_is_kept_as_text_once_it_ends(k):
    shown = displays(
        k,
        '%%dispy --over "range(2)" --into later --nowait\n' + _LATER,
        until=2,
    )
    bar, output = shown.values()
    assert "1/2 done, 1 failed" in bar["text/plain"], bar
    # Before: an ipywidgets Output, its printed lines and traceback only in the
    # widget's model (lost with it).
    assert WIDGET not in output, output
    _assert_later_output(output)


def test_a_nowait_run_without_widgets_updates_its_bar_and_shows_its_output(k):
    """``--nowait`` with HTML progress (``--progress html``, and any run in a kernel
    without ipywidgets): the cell showed the run as it was submitted, '0/2 done, 2
    queued', for good, and nothing its jobs printed or raised. Its bar and output
    are now HTML displays updated in place, as the widgets are."""
    shown = displays(
        k,
        '%%dispy --over "range(2)" --into later --nowait --progress html\n' + _LATER,
        until=2,
        ended=("1/2 done, 1 failed", "KeyError: 'missing'"),
    )
    bar, output = shown.values()
    assert bar["text/plain"].startswith("later: 1/2 done, 1 failed"), bar
    assert "1/2 done, 1 failed" in bar["text/html"], bar
    _assert_later_output(output)


def panel_updates(k: Kernel, display_id: str, code: str, until: str) -> list[str]:
    """Run ``code``; the text of each update of display ``display_id`` (sent under
    any cell) until the kernel is idle and one has ``until``."""
    msg_id = k.submit(code)
    texts: list[str] = []
    idle = False
    deadline = time.monotonic() + CELL_TIMEOUT
    while not (idle and any(until in text for text in texts)):
        assert time.monotonic() < deadline, texts
        try:
            msg = k.client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        content = msg["content"]
        if (
            msg["msg_type"] == "update_display_data"
            and content["transient"].get("display_id") == display_id
        ):
            assert WIDGET not in content["data"], content["data"]
            assert "nodes as of" in content["data"]["text/html"], content["data"]
            texts.append(content["data"]["text/plain"])
        elif msg["msg_type"] == "status" and content["execution_state"] == "idle":
            idle = idle or msg["parent_header"].get("msg_id") == msg_id
    k.client.get_shell_msg(timeout=CELL_TIMEOUT)  # the cell's reply
    return texts


def test_the_node_panel_is_html_redrawn_in_place_as_a_saved_notebook_keeps_it(k):
    """``%dispy panel`` was a live widget: a notebook saved and opened again (or
    shown by nbviewer) read "Error displaying widget: model not found" in its
    place. It is an HTML table redrawn in place (each redraw what the notebook
    saves), stamped with the time it shows."""
    ((display_id, panel),) = displays(k, "%dispy panel").items()
    assert WIDGET not in panel, panel
    assert "nodes as of" in panel["text/html"], panel
    done = re.search(
        r"local-0 \S+ cpus=2 busy=\d+ jobs_done=(\d+)", panel["text/plain"]
    )
    assert done, panel["text/plain"]
    after = int(done.group(1)) + 3
    texts = panel_updates(
        k,
        display_id,
        '%%dispy --over "range(3)" --into three\ndef three(i):\n    return i',
        f"jobs_done={after} ",
    )
    assert texts, "the panel was not redrawn"


def test_a_status_shown_keeps_no_run_a_cell_run_again_let_go(k):
    """The notebook keeps ``%dispy status``'s value (``Out``); it held the runs it
    listed, so the earlier run of a cell run again stayed in memory with its results
    (20 MB here) and in every later status: two 'big' runs."""
    cell = '%%dispy --over "range(2)" --into big\ndef big(i):\n    return bytes(10**7)'
    k.run_ok(cell)
    k.run_ok("import gc, weakref\nearlier = weakref.ref(big)")
    shown = k.run_ok("%dispy status")
    assert "<Run 'big' 2/2 done" in shown.text, shown.text
    k.run_ok(cell)
    assert k.value("gc.collect() >= 0 and earlier() is None") is True
    assert k.run_ok("%dispy status").text.count("<Run 'big' 2/2 done") == 1


def test_a_run_going_on_as_the_kernel_shuts_down_ends_cancelled_not_failed(tmp_path):
    """Restart or shut down the kernel during a ``--nowait`` run: its bar (kept
    in the saved notebook) said '2 failed', and its output 'job 1 (input 0) failed:
    job terminated at the client's request', for the jobs the exit ended."""
    marks = tmp_path / "marks"
    marks.mkdir()
    with kernel(tmp_path) as started:
        started.run_ok("%load_ext dispynb\n%dispy local --cpus 2")
        shown = displays(
            started,
            f'%%dispy --over "range(4)" --into long --nowait\n'
            "def long(i):\n"
            "    import time\n"
            f"    open({str(marks)!r} + f'/{{i}}', 'w').close()\n"
            "    time.sleep(600)",
        )
        deadline = time.monotonic() + CELL_TIMEOUT
        while len(list(marks.iterdir())) < 2:  # 2 run, 2 queued
            assert time.monotonic() < deadline, "the jobs did not start"
            time.sleep(0.05)
        started.manager.shutdown_kernel(now=False)  # as JupyterLab's restart does
        while True:  # what the kernel sent on its way out
            try:
                msg = started.client.get_iopub_msg(timeout=2)
            except queue.Empty:
                break
            content = msg["content"]
            display_id = content.get("transient", {}).get("display_id")
            if msg["msg_type"] == "update_display_data" and display_id in shown:
                shown[display_id] = content["data"]
    bar, output = shown.values()
    assert WIDGET not in bar, bar
    assert "0/4 done, 4 cancelled" in bar["text/plain"], bar
    assert "failed" not in bar["text/plain"] + output.get("text/plain", ""), shown


def test_dispy_close_leaves_the_panel_as_it_last_stood_saying_so(tmp_path):
    """``%dispy close`` at a notebook's end redrew its ``%dispy panel`` (saved
    above the runs, as on the docs site) with every node greyed as gone. The
    panel keeps the nodes with their jobs, stamped with the close."""
    with kernel(tmp_path) as started:
        started.run_ok("%load_ext dispynb\n%dispy local --nodes 2 --cpus 1")
        ((display_id, _shown),) = displays(started, "%dispy panel").items()
        started.run_ok(
            '%%dispy --over "range(6)" --into six\ndef six(i):\n    return i'
        )
        texts = panel_updates(started, display_id, "%dispy close", "%dispy close")
        last = texts[-1]
        assert "gone" not in last, last
        assert last.count(" idle") == 2, last
        done = re.findall(r"jobs_done=(\d+)", last)
        assert sum(map(int, done)) == 6, last
        assert last.endswith("when %dispy close stopped them"), last
        # New nodes: the panel follows them again, the old ones gone. The new node
        # may be on a port an old one had (freed as it exited): that row is the
        # new node's (CI, 2026-12-07: one old row gone, the other the new node's).
        old = set(re.findall(r"127\.0\.0\.1:\d+", last))
        assert len(old) == 2, last
        started_new = started.run_ok("%dispy local --cpus 1")
        new = set(re.findall(r"127\.0\.0\.1:\d+", started_new.text))
        assert len(new) == 1, started_new.text
        ((_, again),) = displays(started, "%dispy panel").items()
        rows = again["text/plain"].splitlines()[1:]
        gone = {a for row in rows if row.endswith(" gone") for a in old if a in row}
        assert gone == old - new, again
        assert "%dispy close" not in again["text/plain"], again
        started.run_ok("%dispy close")


def test_dispy_close_says_what_it_stopped_and_only_that(tmp_path):
    """``%dispy close`` after finished runs says its nodes stopped (it said 'runs
    cancelled and closed' of runs that had all finished, at every tutorial's end);
    with a ``--nowait`` run going, the line that says what it stopped comes first."""
    with kernel(tmp_path) as started:
        started.run_ok("%load_ext dispynb\n%dispy local --cpus 1")
        started.run_ok(
            '%%dispy --over "range(2)" --into two\ndef two(i):\n    return i'
        )
        closed = started.run_ok("%dispy close")
        assert closed.streams == [("stdout", "dispynb: local nodes stopped\n")]

        started.run_ok("%dispy local --cpus 1")
        started.run_ok(
            '%%dispy --over "range(4)" --into bg --nowait\n'
            "def bg(i):\n    import time\n    time.sleep(60)"
        )
        closed = started.run_ok("%dispy close")
        names = [name for name, _ in closed.streams]
        assert names == ["stderr", "stdout"], closed.streams
        assert closed.stderr.startswith("dispynb: run 'bg' stopped, 4 cancelled")
        assert closed.stdout == "dispynb: local nodes stopped\n"
        assert (
            started.run_ok("%dispy close").stdout == "dispynb: no nodes were in use\n"
        )
