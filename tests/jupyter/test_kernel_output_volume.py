"""What a running ``%%dispy`` cell sends on a real kernel's IOPub channel.

A Jupyter server keeps every IOPub message of a kernel whose notebook tab is closed
(to replay it when the tab comes back), without bound: a run of hours must not send
a steady stream of redraws. The kernel here is set up as a notebook in JupyterLab
leaves it when its tab is closed: the dispynb panel's comm open, the node panel
shown, a ``%%dispy`` cell waiting with its progress bar. The tests count the
messages the kernel sends over a window of time (all of them: each one is kept).
"""

from __future__ import annotations

import collections
import queue
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.jupyter.kernel import CELL_TIMEOUT, Kernel, kernel

pytestmark = pytest.mark.slow

#: Seconds over which messages are counted.
WINDOW = 15.0

HELD_CELL = """%%dispy --over WORK --unpack --into held
def held(gate, value):
    import os, time
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.02)  # a busy run: at most 100 jobs a second on 2 CPUs
    return value
"""


def _as_a_closed_tab_leaves_it(k: Kernel) -> None:
    """Local nodes, the lab panel's comm open and the node panel shown."""
    k.run_ok("%load_ext dispynb\n%dispy local --cpus 2")
    k.run_ok("from dispynb.jupyter import labcomm; labcomm.register()")
    content = {"comm_id": uuid.uuid4().hex, "target_name": "dispynb.lab", "data": {}}
    k.client.shell_channel.send(k.client.session.msg("comm_open", content))
    k.run_ok("%dispy panel")


def _label(msg: dict[str, Any]) -> str:
    """The text a widget update sets (a progress bar's label), or ``""``."""
    if msg["msg_type"] != "comm_msg":
        return ""
    value = msg["content"]["data"].get("state", {}).get("value")
    return value if isinstance(value, str) else ""


def _wait_for_label(k: Kernel, text: str) -> None:
    deadline = time.monotonic() + CELL_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no progress label with {text!r}"
        try:
            if text in _label(k.client.get_iopub_msg(timeout=left)):
                return
        except queue.Empty:
            continue


def _messages(k: Kernel, seconds: float) -> list[dict[str, Any]]:
    """The IOPub messages the kernel sends in the next ``seconds``."""
    messages = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            messages.append(k.client.get_iopub_msg(timeout=left))
        except queue.Empty:
            break
    return messages


def _busy(tmp_path: Path, jobs: int) -> list[dict[str, Any]]:
    """The IOPub messages a busy run of ``jobs`` jobs sends over `WINDOW` seconds,
    once it shows two running; then stopped."""
    with kernel(tmp_path) as k:
        _as_a_closed_tab_leaves_it(k)
        k.run_ok(f"WORK = [(None, i) for i in range({jobs})]")
        msg_id = k.submit(HELD_CELL)
        _wait_for_label(k, "done, 2 running")
        messages = _messages(k, WINDOW)
        k.stop_button()
        out = k.collect(msg_id)
    assert out.ename == "RunInterrupted", out.text
    return messages


def _count(k: Kernel, seconds: float) -> collections.Counter[str]:
    """The IOPub messages the kernel sends in the next ``seconds``, by kind."""
    return _kinds(_messages(k, seconds))


def _kinds(messages: list[dict[str, Any]]) -> collections.Counter[str]:
    """``messages`` by kind (widget updates by the widget's comm, the panel's by
    its message type)."""
    counts: collections.Counter[str] = collections.Counter()
    for msg in messages:
        data = msg["content"].get("data", {}) if msg["msg_type"] == "comm_msg" else {}
        if "state" in data:
            counts[f"widget {msg['content']['comm_id'][:6]}"] += 1
        else:
            counts[f"{msg['msg_type']} {data.get('type', '')}".strip()] += 1
    return counts


@pytest.mark.timeout(120)
def test_a_cell_whose_jobs_all_run_long_sends_next_to_nothing(tmp_path: Path) -> None:
    """Two jobs done, two running long: nothing changes but the time and the
    nodes' load figures (reported every second), which show every 10 s."""
    gate = tmp_path / "gate"
    with kernel(tmp_path) as k:
        _as_a_closed_tab_leaves_it(k)
        k.run_ok(
            f"WORK = [(None, 1), (None, 2), ({str(gate)!r}, 3), ({str(gate)!r}, 4)]"
        )
        msg_id = k.submit(HELD_CELL)
        _wait_for_label(k, "2/4 done, 2 running")
        _count(k, 2.0)  # what that change brought (panels follow within a second)
        counts = _count(k, WINDOW)
        gate.touch()
        out = k.collect(msg_id)

    assert out.status == "ok", out.text
    print(f"a held run sent in {WINDOW} s: {dict(counts)}")
    # Before: about 5 a second (the label's rate and ETA redrawn 4 times a second,
    # every load report pushed to both panels).
    assert sum(counts.values()) <= 10, counts


@pytest.mark.timeout(120)
def test_a_busy_cell_sends_at_a_bounded_rate(tmp_path: Path) -> None:
    """Jobs ending all the time: the progress bar redraws at most twice a second,
    each panel at most once a second."""
    counts = _kinds(_busy(tmp_path, 5_000))  # 50 s at least
    print(f"a busy run sent in {WINDOW} s: {dict(counts)}")
    # Two widgets (bar, label) at 2 draws a second, two panels at 1: 6 a second,
    # and a few more (a trailing draw, the first of each). Before: about 15.
    assert sum(counts.values()) <= 6 * WINDOW + 10, counts


@pytest.mark.timeout(120)
def test_a_long_busy_cell_sends_no_redraw_that_changes_nothing_on_screen(
    tmp_path: Path,
) -> None:
    """100,000 jobs, about 70 ending a second: between two redraws the bar moves by
    a 3000th of its width, less than a pixel. Its widget is sent a new position
    only when the bar moves a whole step (`BAR_STEPS`), and the node panel's
    table is sent without a style on each of its cells. Before: every redraw
    moved the bar (30 messages in 15 s that changed nothing on the screen), and
    each table was 1.4 kB for one node."""
    from dispynb.jupyter.progress import BAR_STEPS

    messages = _busy(tmp_path, 100_000)
    values = [
        msg["content"]["data"]["state"]["value"]
        for msg in messages
        if msg["msg_type"] == "comm_msg"
        and "value" in msg["content"]["data"].get("state", {})
    ]
    tables = [  # the node panel's redraws
        msg["content"]["data"].get("text/html", "")
        for msg in messages
        if msg["msg_type"] == "update_display_data"
        and "dispynb-nodes" in msg["content"]["data"].get("text/html", "")
    ]
    labels = [v for v in values if isinstance(v, str)]
    positions = [v for v in values if isinstance(v, int)]
    assert len(labels) >= 10, values  # the run went on, its counts shown
    steps = [position * BAR_STEPS // 100_000 for position in positions]
    assert len(set(steps)) == len(steps), positions  # each one moved the bar
    assert tables and max(len(table) for table in tables) < 800, tables[-1]
    print(f"in {WINDOW} s: {len(labels)} labels, bar moved {len(positions)} times")
