"""Stop (the toolbar's interrupt) and the panel's Cancel in JupyterLab and Chromium:
the cell returns, its jobs end as the cell and the sidebar say, the nodes serve
the next cells (run in the private network namespace by
`test_lab_browser.test_lab_panel_in_private_network`).
"""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.browser import requires_chromium
from tests.labextension.labpage import (
    PANEL,
    ROOT,
    Lab,
    card_counts,
    closed_statuses,
    notebook_page,
    output,
    prompt,
    run_cell,
    run_the_next_cells,
    start_run,
    stop_kernel,
    wait_counts,
    wait_prompt,
)

pytestmark = [pytest.mark.browser, requires_chromium]

#: The Stop journey: %dispy local, a long %%dispy cell stopped with the toolbar's
#: Stop button, then the next cells on the same nodes.
STOP_CELLS = [
    "%load_ext dispynb\n%dispy local --cpus 2",
    '%%dispy --over "range(40)" --into slow\n'
    "def slow(i):\n"
    "    import time\n"
    "    time.sleep(2)\n"
    "    return i",
    '%%dispy --over "range(4)" --into after\ndef square(x):\n    return x * x',
    "c = slow.counts()\n"
    "print(after.results, len(slow.failures), c.finished + c.cancelled)",
    "%dispy panel",
]


#: A %%dispy run whose jobs end every way: 4 finish, 2 raise, then the panel's Cancel
#: ends 2 running (terminated) and 4 queued ones.
OUTCOME_CELLS = [
    "%load_ext dispynb\n%dispy local --cpus 2",
    '%%dispy --over "range(12)" --into mixed\n'
    "def mixed(i):\n"
    "    import time\n"
    "    if i in (1, 4):\n"
    "        raise ValueError(i)\n"
    "    if i >= 6:\n"
    "        time.sleep(600)\n"
    "    return i",
]


@pytest.mark.timeout(300)
def test_lab_stop(lab: Lab) -> None:  # collected only in the namespace: conftest.py
    """Stop (the toolbar button) in a %%dispy cell: the cell returns at once, its jobs
    are cancelled, the %dispy local nodes keep serving the next cells; the sidebar
    shows no phantom cluster and where the closed runs ran."""
    with notebook_page(lab, "stop.ipynb", STOP_CELLS) as page:
        cells = page.locator(".jp-NotebookPanel .jp-Cell")
        run_cell(page, 0)
        wait_prompt(page, 0, "[1]:")
        assert "dispynb: local nodes 127.0.0.1:" in cells.nth(0).inner_text()
        # %dispy local checked its node with a cluster of its own: never shown.
        session = page.locator(f"{PANEL} .dispynb-session")
        session.filter(has_text="%dispy uses local nodes").wait_for()
        assert "No clusters" in page.locator(f"{PANEL} .dispynb-clusters").inner_text()

        run_cell(page, 1)
        card = page.locator(f"{PANEL} .dispynb-cluster")
        card.first.wait_for()
        wait_counts(page, "c.running === 2")  # executing, on a node of 2 CPUs
        assert card.locator(".dispynb-cancel").is_enabled()
        assert prompt(page, 1).strip() == "[*]:"

        pressed = time.monotonic()
        stop_kernel(page)
        wait_prompt(page, 1, "[2]:")
        returned = time.monotonic() - pressed
        text = output(page, 1)
        stopped = "KeyboardInterrupt: Interrupted: run 'slow' stopped, 40 cancelled, 2 "
        assert stopped in text, text
        assert "Traceback" not in text and "dispynb/" not in text, text
        print(f"Stop click to prompt [2]: {returned:.2f} s")
        assert returned < 10, returned

        # The closed card: no Cancel button, the node it ran on (released), not
        # "no nodes connected yet"; counts: cancelled, nothing failed (the running
        # jobs it stopped too, as the cell counts them).
        statuses = closed_statuses(page)
        closed = page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]')
        assert closed.locator(".dispynb-cluster-name").inner_text() == "slow (closed)"
        assert not closed.locator(".dispynb-cancel").is_visible()
        node = closed.locator(".dispynb-node")
        assert node.count() == 1 and node.get_attribute("data-released") == "true"
        assert "no nodes connected yet" not in closed.inner_text()
        assert "failed" not in statuses and "cancelled" in statuses, statuses
        # Done as the cell's bar says it: the jobs that finished, not all that ended.
        finished = card_counts(page).get("done", 0)
        text = closed.locator(".dispynb-progress-text").inner_text()
        assert text == f"{finished}/40 done", text
        if os.environ.get("DISPYNB_SCREENSHOTS") == "1":
            page.screenshot(path=str(ROOT / "docs/lab-stop.png"))

        # The next cells run on the same nodes.
        printed = run_the_next_cells(page)
        assert "[0, 1, 4, 9] 0 40" in printed, printed
        # The panel is pushed at most 4 times a second: wait for the card of the
        # run 'after' (named as the notebook names it, not after its function).
        want = ["after (closed)", "slow (closed)"]
        names: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            names = page.locator(f"{PANEL} .dispynb-cluster-name").all_inner_texts()
            if sorted(names) == want:
                break
            page.wait_for_timeout(100)
        assert sorted(names) == want, names

        # The node panel, redrawn in place: its cells styled once for the table (a
        # redraw a second sends a third of the bytes), where a static snapshot
        # styles each.
        run_cell(page, 4)
        cell = cells.nth(4).locator(".jp-OutputArea .dispynb-nodes td").first
        cell.wait_for()
        padding = cell.evaluate("e => getComputedStyle(e).padding")
        assert padding == "1px 8px", padding


@pytest.mark.timeout(300)
def test_lab_outcomes_as_the_cell_says(lab: Lab) -> None:  # in the namespace
    """A run with finished, failed and cancelled jobs: the card's chips name and
    count them as the cell's summary line does, its progress says done as the cell,
    and the node's line says how many jobs ended on it (not 'done': failed ones and
    those cancelled while running are among them)."""
    with notebook_page(lab, "outcomes.ipynb", OUTCOME_CELLS) as page:
        start_run(page)
        card = page.locator(f"{PANEL} .dispynb-cluster")
        # Jobs 0-5 ended (2 raised), 6 and 7 sleep on the node's 2 CPUs, 4 queued.
        wait_counts(page, "c.running === 2 && c.ended === 6 && c.queued === 4")
        card.locator(".dispynb-cancel").click()
        wait_prompt(page, 1, "[2]:")

        text = output(page, 1)
        line = re.search(r"(\d+)/12 done, (\d+) failed, (\d+) cancelled", text)
        assert line, text
        said = dict(
            zip(("done", "failed", "cancelled"), map(int, line.groups()), strict=True)
        )
        assert said == {"done": 4, "failed": 2, "cancelled": 6}, text

        closed = page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]')
        closed.wait_for()
        chips = closed.locator(".dispynb-count")
        shown = dict(
            zip(
                chips.evaluate_all("es => es.map(e => e.dataset.status)"),
                chips.evaluate_all("es => es.map(e => +e.dataset.count)"),
                strict=True,
            )
        )
        assert shown == said, (shown, text)
        assert chips.all_inner_texts() == ["4 done", "2 failed", "6 cancelled"]
        assert closed.locator(".dispynb-progress-text").inner_text() == "4/12 done"
        assert closed.get_attribute("data-ended") == "12"
        # The jobs that ended on the one node: 4 done, 2 failed and the 2 Cancel
        # stopped while running, not '8 done' beside the card's '4/12 done'. The 4
        # cancelled before they started name no node, as dispy's queued jobs
        # (2ea3178), though they waited in its queue.
        node = closed.locator(".dispynb-node")
        assert node.count() == 1
        info = node.locator(".dispynb-node-info").inner_text()
        assert node.get_attribute("data-ended") == "8", info
        assert "8 ended" in info and "done" not in info, info
