"""The lab extension's sidebar in JupyterLab and Chromium: its cluster card, node
list, Cancel, discovery and connect code, kernels without dispynb, and a page
reloaded while a cell runs (run in the private network namespace by
`test_lab_browser.test_lab_panel_in_private_network`).
"""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.browser import chromium_page, requires_chromium
from tests.labextension.labpage import (
    ACTIVE,
    PANEL,
    ROOT,
    TAB,
    Lab,
    card_counts,
    insert_and_check,
    kernel_connections,
    kernel_status,
    notebook_page,
    open_notebook,
    output,
    placeholder_room,
    reload_page,
    restart_kernel,
    run_and_wait,
    run_cell,
    run_the_next_cells,
    start_run,
    subshells,
    wait_counts,
    wait_panel_ready,
    wait_prompt,
    write_notebook,
)

pytestmark = [pytest.mark.browser, requires_chromium]

#: The notebook's first cell: local nodes, and slow-ish jobs it waits for.
FIRST_CELL = """\
from dispynb import JobCluster, LocalCluster

def slow(i):
    import time
    time.sleep(0.3)
    return i

local = LocalCluster(nodes=1, cpus=2)
cluster = JobCluster(slow, nodes=local)
jobs = [cluster.submit(i) for i in range(200)]
cluster.wait()  # the kernel stays busy: the panel must still update and cancel"""


#: A long %%dispy run, during which the page is reloaded; then a cell after it.
REOPEN_CELLS = [
    "%load_ext dispynb\n%dispy local --cpus 2",
    '%%dispy --over "range(60)" --into slow\n'
    "def slow(i):\n"
    "    import time\n"
    "    time.sleep(1)\n"
    "    return i",
    '%%dispy --over "range(4)" --into after\ndef square(x):\n    return x * x',
    "c = slow.counts()\nprint(after.results, c.finished + c.cancelled, c.failed)",
]


@pytest.mark.timeout(180)
def test_lab_panel(lab: Lab) -> None:  # collected only in the namespace: conftest.py
    write_notebook(lab.root, "lab.ipynb", [FIRST_CELL])
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=60_000
    ) as page:
        page.goto(f"{lab.url}/lab?token={lab.token}")
        page.wait_for_selector(".jp-Launcher", state="visible")

        # No notebook yet: the panel says so.
        page.locator(TAB).click()
        status = page.locator(f"{PANEL} .dispynb-status-text")
        assert "Open a notebook" in status.inner_text(timeout=30_000)

        open_notebook(page, lab, "lab.ipynb")
        # The panel bootstrapped the kernel side silently: no output, no prompt number.
        wait_panel_ready(page)
        assert "No clusters" in page.locator(f"{PANEL} .dispynb-clusters").inner_text()
        # The address box shows its whole placeholder in the sidebar as it opens
        # (it read 'IP addresses (op'), its Discover button inside the panel too.
        room = placeholder_room(page, f"{PANEL} .dispynb-addresses")
        assert room["placeholder"] == "IP addresses (optional)", room
        assert room["text"] <= room["room"], room
        inside = page.eval_on_selector(
            f"{PANEL} .dispynb-discover",
            """b => { const r = b.getBoundingClientRect();
                const p = b.closest('.dispynb-panel').getBoundingClientRect();
                return r.left >= p.left && r.right <= p.right && r.width > 0; }""",
        )
        assert inside
        prompt = page.locator(".jp-Cell .jp-InputPrompt").first
        assert prompt.inner_text().strip() == "[ ]:"

        run_cell(page, 0)

        # The cluster appears with its node, and its progress moves as jobs finish.
        card = page.locator(f"{PANEL} .dispynb-cluster")
        card.wait_for()
        assert card.locator(".dispynb-cluster-name").inner_text() == "slow"
        node = card.locator(".dispynb-node")
        node.first.wait_for()
        assert node.count() == 1
        assert node.get_attribute("data-name") == "local-0"
        assert node.get_attribute("data-address").startswith("127.0.0.1:")
        assert node.get_attribute("data-cpus") == "2"
        assert "2 CPUs" in node.inner_text()
        # Its load, as it reported it (a dispynb node does, from its first word).
        info = node.locator(".dispynb-node-info").inner_text()
        assert re.search(r"\d+% CPU used · [\d.]+ [KMG]?B free$", info), info
        wait_counts(page, "c.total === 200 && c.running > 0")
        first = card_counts(page)
        wait_counts(page, f"c.ended >= {first['ended'] + 2}")
        second = card_counts(page)
        assert second["ended"] > first["ended"] and second.get("done", 0) >= 2
        width = card.locator(".dispynb-progress-bar").evaluate("e => e.style.width")
        assert 0 < float(width.rstrip("%")) < 100, width
        if os.environ.get("DISPYNB_SCREENSHOTS") == "1":
            wait_counts(page, "c.ended >= 30")  # a bar worth looking at
            page.screenshot(path=str(ROOT / "docs/labextension.png"))

        # Cancel (while the cell still waits) ends every unfinished job; the counts
        # say how they ended, and the cell returns.
        assert prompt.inner_text().strip() == "[*]:"
        card.locator(".dispynb-cancel").click()
        message = page.locator(f"{PANEL} .dispynb-message")
        message.filter(has_text="cancelled").wait_for()
        wait_counts(page, "!c.running && !c.queued && c.ended === 200")
        # (A cluster of no run too: its running jobs, terminated, count as
        # cancelled, not failed.)
        counts = card_counts(page)
        assert counts.get("cancelled", 0) > 100 and "failed" not in counts, counts
        assert counts["done"] + counts["cancelled"] == 200, counts
        cancel = card.locator(".dispynb-cancel")
        assert cancel.is_disabled()
        # ... and looks it: faded and grey, not the red of an active button.
        assert float(cancel.evaluate("e => getComputedStyle(e).opacity")) < 0.6
        assert "grayscale" in cancel.evaluate("e => getComputedStyle(e).filter")
        page.wait_for_function(
            """() => document.querySelector('.jp-Cell .jp-InputPrompt')
                .textContent.trim() === '[1]:'"""
        )

        # Insert connect code: local nodes while none was discovered ...
        insert_and_check(page, "%dispy local")

        # ... Discover with no address: a broadcast, which the node bound to
        # 127.0.0.1 does not answer; the list says so, not 'press Discover' again ...
        discovered = page.locator(f"{PANEL} .dispynb-discovered")
        assert discovered.inner_text() == "none yet: press Discover"
        page.locator(f"{PANEL} .dispynb-discover").click()
        message.filter(has_text="discovery found 0 nodes").wait_for()
        discovered.filter(has_text="no node answered").wait_for()
        # ... a mistake in the box: said once, with what to type (not "discovery
        # failed" twice, nor the API's '<broadcast>' and multicast groups) ...
        box = page.locator(f"{PANEL} .dispynb-addresses")
        box.fill("10.0.0.300")
        page.locator(f"{PANEL} .dispynb-discover").click()
        message.filter(has_text="Discover failed").wait_for()
        said = message.inner_text()
        assert said.startswith("Discover failed: '10.0.0.300' is not an IP address,")
        assert "host names (10.0.0.5, node1)" in said and "empty" in said, said
        assert said.count("failed") == 1 and "<broadcast>" not in said, said
        # ... Discover at a host name and the node's address as lists show it
        # (its TCP port, not its discovery port): the node answers; then code
        # that connects to it.
        box.fill(f"localhost:{lab.node_port}")
        page.locator(f"{PANEL} .dispynb-discover").click()
        found = page.locator(f"{PANEL} .dispynb-discovered tbody tr")
        found.first.wait_for()
        spec = f"127.0.0.1:{lab.node_port}"
        assert found.first.locator("td").all_inner_texts() == ["found-node", spec, "1"]
        message.filter(has_text="discovery found 1 node").wait_for()
        insert_and_check(page, f"%dispy nodes {spec}")
        # ... and that code works (given the secret): run it; the panel shows the
        # nodes %dispy uses.
        page.locator(f"{ACTIVE} .cm-content").click()
        page.keyboard.press("Control+End")
        page.keyboard.type(f" --secret-file {lab.secret_file}")
        page.keyboard.press("Shift+Enter")
        output = page.locator(".jp-OutputArea-output")
        output.filter(has_text=f"dispynb: nodes {spec}").wait_for()
        session = page.locator(f"{PANEL} .dispynb-session")
        session.filter(has_text=f"%dispy uses nodes {spec}").wait_for()

        # A kernel restart: the panel reconnects to the new kernel (no clusters).
        restart_kernel(page)
        assert not session.is_visible()  # the new kernel has not run %dispy

        # A kernel without dispynb: a clear message and a Retry button.
        open_notebook(page, lab, "plain.ipynb", "No dispynb")
        page.wait_for_selector(f'{PANEL} .dispynb-status[data-status="missing"]')
        text = status.inner_text()
        assert "dispynb is not installed in this kernel's environment" in text, text
        assert page.locator(f"{PANEL} .dispynb-retry").is_visible()

        # No kernel at all (shut down): the panel says to select one.
        page.locator(".lm-MenuBar-item", has_text="Kernel").click()
        page.locator('.lm-Menu-item[data-command="kernelmenu:shutdown"]').click()
        status.filter(has_text="This notebook has no kernel").wait_for()


@pytest.mark.timeout(200)
def test_lab_page_opened_while_a_cell_runs(lab: Lab) -> None:  # in the namespace
    """A page opened (here: reloaded) while a long %%dispy cell runs, as a person
    closes the tab and comes back: the kernel answers nothing on its main shell
    until the cell ends (JupyterLab's kernel_info waits there too), so the panel
    said 'a running cell holds it' for the rest of the run. It now asks on the
    control channel and connects on a kernel subshell: the run's card shows while
    the cell runs, and its Cancel ends the run; the next cells work."""
    with notebook_page(lab, "reopen.ipynb", REOPEN_CELLS) as page:
        start_run(page)
        wait_counts(page, "c.running === 2")
        before = set(subshells(lab))  # JupyterLab's own, for the comms

        reload_page(page)
        card = page.locator(f'{PANEL} .dispynb-cluster[data-closed="false"]')
        card.wait_for()
        assert card.locator(".dispynb-cluster-name").inner_text() == "slow"
        wait_counts(page, "c.total === 60 && c.running > 0")
        assert card_counts(page)["ended"] < 60  # connected while the cell runs

        # Reloaded again: the page deletes its subshell as it goes, and the new page
        # makes one of its own (the kernel kept one per page: a thread each).
        (first,) = set(subshells(lab)) - before  # the panel's
        reload_page(page)
        card.wait_for()
        wait_counts(page, "c.total === 60 && c.running > 0")
        again = set(subshells(lab)) - before
        assert len(again) == 1 and first not in again, (first, again)
        # The subshell's answers do not make the kernel look idle meanwhile.
        assert kernel_status(page) == "Python 3 (ipykernel) | Busy"

        card.locator(".dispynb-cancel").click()
        page.locator(f"{PANEL} .dispynb-message").filter(
            has_text="cancelled"
        ).wait_for()
        wait_counts(page, "!c.running && !c.queued && c.ended === 60")
        page.wait_for_function(
            """() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
                .some(e => e.textContent.trim().endsWith('| Idle'))"""
        )
        # The cell has returned: the next cells run, on the same nodes.
        printed = run_the_next_cells(page)
        assert "[0, 1, 4, 9] 60 0" in printed, printed

        # A kernel restart drops the subshell's connection; the panel reconnects.
        assert kernel_connections(lab) == [2]  # the page's, and the panel's
        restart_kernel(page)
        deadline = time.monotonic() + 20
        while kernel_connections(lab) != [1] and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert kernel_connections(lab) == [1]


#: A --nowait run that ends after the page is reloaded.
NOWAIT_CELLS = [
    "%load_ext dispynb\n%dispy local --cpus 2",
    '%%dispy --over "range(6)" --into later --nowait\n'
    "def later(i):\n"
    "    import time\n"
    "    time.sleep(3)\n"
    "    print('hello from', i)\n"
    "    return i",
]


@pytest.mark.timeout(180)
def test_lab_page_reloaded_during_a_nowait_run(lab: Lab) -> None:  # in the namespace
    """A page reloaded (saved first, as JupyterLab autosaves) while a ``--nowait``
    run goes on: its bar and printed lines are shown again from the kernel's
    widgets and end as the run ends. Before, the end closed those widgets (it
    updated the display by its id, which only the page that ran the cell knows):
    the reloaded page's bar and output vanished, leaving the cell blank."""
    with notebook_page(lab, "nowait.ipynb", NOWAIT_CELLS) as page:
        run_and_wait(page, 0)
        run_and_wait(page, 1)  # --nowait: the cell returns at once
        wait_counts(page, "c.running === 2")
        page.keyboard.press("Control+s")
        page.wait_for_function(
            "() => !document.querySelector('.lm-TabBar-tab.jp-mod-dirty')"
        )
        reload_page(page)
        bar = page.locator(".jp-NotebookPanel .jp-Cell").nth(1).locator(".widget-hbox")
        bar.wait_for()  # restored from the kernel's widgets
        page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]').wait_for()
        deadline = time.monotonic() + 20
        while "6/6 done" not in (text := output(page, 1)):
            assert time.monotonic() < deadline, text
            page.wait_for_timeout(100)
        assert "hello from 5" in text, text


#: A --nowait run on two local nodes, then one of them dies (SIGKILL).
LOST_CELLS = [
    "%load_ext dispynb\n%dispy local --nodes 2 --cpus 1",
    '%%dispy --over "range(40)" --into steady --nowait\n'
    "def steady(i):\n"
    "    import time\n"
    "    time.sleep(1)\n"
    "    return i",
    "import os, signal\n"
    "local = get_ipython().magics_manager.registry['DispyMagics'].session.local\n"
    "os.kill(local.pids[1], signal.SIGKILL)",
    "steady.cancel()",
]


@pytest.mark.timeout(180)
def test_lab_node_lost_under_a_run(lab: Lab) -> None:  # in the namespace
    """A node that dies while its run goes on: its card says it in words, a red
    LOST badge and 'lost: died, stopped or cut off', its name struck through.
    Before, the panel showed it as a released node ('1 CPU · 3 ended ·
    released'), with '(lost)' stuck to its name by the kernel."""
    with notebook_page(lab, "lost.ipynb", LOST_CELLS) as page:
        start_run(page)
        nodes = page.locator(f"{PANEL} .dispynb-cluster .dispynb-node")
        page.wait_for_function(
            f"() => document.querySelectorAll('{PANEL} .dispynb-node').length === 2"
        )
        wait_counts(page, "c.ended >= 2")
        run_and_wait(page, 2)  # prompt [3]: the run's cell returned at once

        lost = page.locator(f'{PANEL} .dispynb-node[data-lost="true"]')
        lost.wait_for()
        assert nodes.count() == 2
        assert lost.get_attribute("data-name") == "local-1"  # no suffix: a badge
        badge = lost.locator(".dispynb-node-badge")
        assert badge.inner_text() == "LOST", badge.inner_text()
        assert "died" in (badge.get_attribute("title") or "")
        info = lost.locator(".dispynb-node-info").inner_text()
        assert re.fullmatch(r"1 CPU · \d+ ended · lost: died, stopped or cut off", info)
        name = lost.locator(".dispynb-node-name")
        assert name.inner_text() == "local-1"
        assert "line-through" in name.evaluate(
            "e => getComputedStyle(e).textDecorationLine"
        )
        alive = page.locator(f'{PANEL} .dispynb-node[data-lost="false"]')
        assert alive.get_attribute("data-name") == "local-0"
        assert "busy" in alive.locator(".dispynb-node-info").inner_text()

        run_and_wait(page, 3)
        wait_counts(page, "!c.running && !c.queued")


def setup_cells(release: str) -> list[str]:
    """A %%dispy cell whose setup holds the nodes until ``release`` exists (a model
    loading), named otherwise than its function (``--into preds``)."""
    return [
        "%load_ext dispynb\n%dispy local --cpus 2",
        "def load_model():\n"
        "    import os, time\n"
        "    deadline = time.monotonic() + 120\n"
        f"    while not os.path.exists({release!r}) and time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    return 0",
        '%%dispy --over "range(4)" --setup load_model --into preds\n'
        "def predict(x):\n"
        "    return x * 2",
    ]


@pytest.mark.timeout(180)
def test_lab_run_starting_on_its_nodes(lab: Lab) -> None:  # in the namespace
    """While the nodes run a cell's setup, its card bears the run's name and says
    it is starting. Before, it read 'predict' (the function) and 'no nodes
    connected yet' for as long as the setup ran, then became 'preds'."""
    release = lab.root / "release"
    with notebook_page(lab, "starting.ipynb", setup_cells(str(release))) as page:
        run_and_wait(page, 0)
        run_and_wait(page, 1)
        run_cell(page, 2)
        card = page.locator(f'{PANEL} .dispynb-cluster[data-starting="true"]')
        try:
            card.wait_for()
            assert card.locator(".dispynb-cluster-name").inner_text() == "preds"
            text = card.locator(".dispynb-empty").inner_text()
            assert text.startswith("starting: connecting to its nodes"), text
            assert not card.locator(".dispynb-cancel").is_enabled()
        finally:
            release.touch()
        page.wait_for_function(
            """() => [...document.querySelectorAll(
                '#dispynb-sidebar .dispynb-cluster-name')]
                .some(e => e.textContent === 'preds (closed)')"""
        )
        closed = page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]')
        assert closed.get_attribute("data-starting") == "false"
        assert closed.get_attribute("data-ended") == "4"
        assert page.locator(f"{PANEL} .dispynb-cluster").count() == 1


#: A long %%dispy run (about 10 s on 2 CPUs), after the kernel's connect cell.
BUSY_CELLS = [
    "%load_ext dispynb\n%dispy local --cpus 2",
    '%%dispy --over "range(20)" --into long\n'
    "def long(i):\n"
    "    import time\n"
    "    time.sleep(1)\n"
    "    return i",
]


@pytest.mark.timeout(180)
def test_lab_kernel_busy_while_a_cell_runs(lab: Lab) -> None:  # in the namespace
    """The status bar says the kernel is Busy for as long as a %%dispy cell runs
    (its prompt ``[*]``), then Idle. Before, it said Idle for most of the run, while
    the cell showed ``[*]`` and the toolbar's circle busy: JupyterLab made a kernel
    subshell for the run's progress widget (its first comm of that target since
    the restart), and took the idle the kernel sent for that control request as
    the kernel's status."""
    with notebook_page(lab, "busy.ipynb", BUSY_CELLS) as page:
        restart_kernel(page)  # as the user met it: a fresh kernel
        wait_panel_ready(page)
        # Every status the bar shows, with cell 1's prompt at that moment.
        page.evaluate(
            """() => {
                window.dispynbSeen = [];
                const look = () => {
                    const item = [...document.querySelectorAll(
                        '.jp-StatusBar-TextItem')]
                        .find(e => e.textContent.includes(' | '));
                    const prompt = document.querySelectorAll(
                        '.jp-NotebookPanel .jp-Cell .jp-InputPrompt')[1];
                    const now = [item ? item.textContent.trim() : '',
                                 prompt.textContent.trim()];
                    const last = window.dispynbSeen[window.dispynbSeen.length - 1];
                    if (!last || last[0] !== now[0] || last[1] !== now[1])
                        window.dispynbSeen.push(now);
                };
                new MutationObserver(look).observe(document.body, {
                    subtree: true, childList: true, characterData: true});
                look();
            }"""
        )
        run_and_wait(page, 0)
        run_cell(page, 1)
        # Jobs have ended and more are running: the cell is in the middle of its run.
        wait_counts(page, "c.total === 20 && c.ended >= 6 && c.running > 0")
        seen = page.evaluate("() => window.dispynbSeen")
        # JupyterLab shows [*] as it sends the cell, Busy when the kernel takes it.
        since = next(i for i, (s, p) in enumerate(seen) if p == "[*]:" and "Busy" in s)
        during = [status for status, p in seen[since:] if p == "[*]:"]
        assert during and all(s.endswith("| Busy") for s in during), seen
        assert kernel_status(page) == "Python 3 (ipykernel) | Busy"
        wait_prompt(page, 1, "[2]:")
        page.wait_for_function(
            """() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
                .some(e => e.textContent.trim() === 'Python 3 (ipykernel) | Idle')"""
        )
