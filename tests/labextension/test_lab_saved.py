"""A notebook saved after its runs and opened again, in JupyterLab and Chromium
(run in the private network namespace by
`test_lab_browser.test_lab_panel_in_private_network`).

JupyterLab does not save widget models with a notebook: a display still a widget
reads "Error displaying widget: model not found" once the notebook is opened again.
A run's bar, and a ``--nowait`` run's output, become static snapshots when the run
ends, and ``%dispy panel`` is HTML redrawn in place (saved as it last stood); the
snapshots and ``%dispy status`` are laid out as the cell drew them (the lab
extension's own styles for its panel once squeezed them into a 16 px grey box):
an output using every class name of the extension's style sheet is styled as the
same HTML without them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.browser import chromium_page, requires_chromium
from tests.labextension.labpage import (
    Lab,
    open_notebook,
    restart_kernel,
    run_and_wait,
    write_notebook,
)

pytestmark = [pytest.mark.browser, requires_chromium]

SAVED_CELLS = [
    "%load_ext dispynb\n%dispy local --cpus 2",
    "%dispy panel",
    '%%dispy --over "range(4)" --into mixed\n'
    "def mixed(i):\n"
    "    if i == 3:\n"
    "        raise ValueError(i)\n"
    "    return i",
    '%%dispy --over "range(2)" --into later --nowait\n'
    "def later(i):\n"
    "    import time\n"
    "    time.sleep(1)\n"
    "    print('hello from', i)\n"
    "    if i == 1:\n"
    "        raise KeyError('missing')\n"
    "    return i",
    "later.wait()\n%dispy status",
]

#: The extension's style sheet (its every rule must be scoped to its sidebar).
BASE_CSS = Path(__file__).resolve().parents[2] / "labextension/style/base.css"


def css_probe_cell() -> str:
    """A cell showing two trees of the same HTML (nested blocks holding headings,
    a table, a disabled button), the first with every class name of `BASE_CSS` on
    each block but the sidebar's own (``dispynb-panel``, its rules' scope), the
    second with none."""
    classes = set(re.findall(r"\.(dispynb-[a-z0-9-]+)", BASE_CSS.read_text()))
    classes.discard("dispynb-panel")
    inside = (
        "<h2>h</h2><h3>h</h3><table><tr><th>h</th><td>d</td></tr></table>"
        "<button disabled>b</button><span>s</span>"
    )

    def tree(title: str, names: str) -> str:
        block = f'<div class="{names}" data-status="error">' if names else "<div>"
        return f'<div title="{title}">{block}{block}x{inside}</div></div></div>'

    html = tree("css-probe-a", " ".join(sorted(classes))) + tree("css-probe-b", "")
    return f"from IPython.display import HTML\nHTML({html!r})"


#: Where the probe's two trees differ in computed style (should be nowhere), as
#: "TAG property: with the classes / without"; null if the probe is not shown.
CSS_PROBE = """() => {
    const a = document.querySelector('.jp-Cell [title="css-probe-a"]');
    const b = document.querySelector('.jp-Cell [title="css-probe-b"]');
    if (!a || !b) return null;
    const bs = [...b.querySelectorAll('*')];  // (a is not last: its margin)
    const diffs = [];
    [...a.querySelectorAll('*')].forEach((e, i) => {
        const ca = getComputedStyle(e), cb = getComputedStyle(bs[i]);
        for (const p of ca) {
            if (ca.getPropertyValue(p) !== cb.getPropertyValue(p)) {
                diffs.push(`${e.tagName} ${p}: ${ca.getPropertyValue(p)} / `
                    + cb.getPropertyValue(p));
            }
        }
    });
    return diffs;
}"""

#: The same rules still style the sidebar (its status line's padding).
SIDEBAR_STYLED = """() => getComputedStyle(
    document.querySelector('#dispynb-sidebar .dispynb-status')).paddingTop"""

#: Whether each run snapshot (``.dispynb-run-progress``) holds its label and bar.
LAID_OUT = """() => [...document.querySelectorAll('.jp-Cell .dispynb-run-progress')]
    .map(e => {
        const box = e.getBoundingClientRect();
        const bar = e.lastElementChild.getBoundingClientRect();
        return bar.height > 0 && bar.bottom <= box.bottom + 1
            && getComputedStyle(e).backgroundColor === 'rgba(0, 0, 0, 0)';
    })"""

#: The node panel's row of the local node once the runs' 6 jobs ended (its text:
#: name, address, CPUs, busy, jobs ended, ...).
PANEL_ROW = re.compile(r"local-0\s+127\.0\.0\.1:\d+\s+2\s+0\s+6\s")


@pytest.mark.timeout(180)
def test_lab_saved_notebook_opened_again(lab: Lab) -> None:
    cells_run = [*SAVED_CELLS, css_probe_cell()]
    path = write_notebook(lab.root, "saved.ipynb", cells_run)
    with chromium_page(viewport={"width": 1200, "height": 1400}) as page:
        open_notebook(page, lab, "saved.ipynb")
        for index in range(len(cells_run)):
            run_and_wait(page, index)
        # Before: .dispynb-status, .dispynb-progress, .dispynb-cluster, ... were
        # restyled in any output (padding, background, borders, a 16 px height).
        diffs = page.evaluate(CSS_PROBE)
        assert diffs == [], diffs[:8]
        assert page.evaluate(SIDEBAR_STYLED) == "6px"
        cells = page.locator(".jp-NotebookPanel .jp-Cell")
        status = cells.nth(4).locator(".jp-OutputArea").inner_text()
        assert "mixed 3/4 done, 1 failed" in status, status
        assert page.evaluate(LAID_OUT) == [True] * 4  # 2 bars, 2 runs in the status
        panel = cells.nth(1).locator(".jp-OutputArea")
        deadline = time.monotonic() + 30
        while not PANEL_ROW.search(panel.inner_text()):  # redrawn by the runs
            assert time.monotonic() < deadline, panel.inner_text()
            time.sleep(0.1)

        # As the next day: the kernel gone (restarted), the notebook saved, opened
        # again. A widget's model is gone with its kernel.
        restart_kernel(page)
        page.keyboard.press("Control+s")
        deadline = time.monotonic() + 30
        while "hello from 1" not in path.read_text():
            assert time.monotonic() < deadline, "the notebook was not saved"
            time.sleep(0.1)
        page.wait_for_function(
            "() => !document.querySelector('.lm-TabBar-tab.jp-mod-dirty')"
        )
        page.reload()
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content")
        cells.nth(4).locator(".dispynb-session-status").wait_for()
        outputs = [
            cells.nth(i).locator(".jp-OutputArea").inner_text()
            for i in range(len(SAVED_CELLS))
        ]
        # Before: "Error displaying widget: model not found" for both runs, and the
        # nowait run's printed lines and traceback gone with its Output widget.
        assert not any("Error displaying widget" in text for text in outputs), outputs
        # Before: the node panel too, a widget ("Loading widget...", no kernel has it).
        assert PANEL_ROW.search(outputs[1]) and "nodes as of" in outputs[1], outputs[1]
        assert "mixed 3/4 done, 1 failed" in outputs[2], outputs[2]
        assert "ValueError: 3" in outputs[2], outputs[2]
        assert "later 1/2 done, 1 failed" in outputs[3], outputs[3]
        assert "hello from 0" in outputs[3] and "hello from 1" in outputs[3]
        assert "KeyError: 'missing'" in outputs[3], outputs[3]
        assert page.evaluate(LAID_OUT) == [True] * 4
        page.locator('.jp-Cell [title="css-probe-b"]').wait_for()
        diffs = page.evaluate(CSS_PROBE)
        assert diffs == [], diffs[:8]
