"""A notebook saved after its runs and opened again, in JupyterLab and Chromium
(run in the private network namespace by
`test_lab_browser.test_lab_panel_in_private_network`).

JupyterLab does not save widget models with a notebook: a display still a widget
reads "Error displaying widget: model not found" once the notebook is opened again.
A run's bar, and a ``--nowait`` run's output, become static snapshots when the run
ends; the snapshots and ``%dispy status`` are laid out as the cell drew them (the
lab extension's own styles for its panel once squeezed them into a 16 px grey box).
"""

from __future__ import annotations

import time

import pytest

from tests.browser import chromium_page, requires_chromium
from tests.labextension.labpage import Lab, open_notebook, run_cell, wait_prompt
from tests.labextension.test_lab_browser import lab  # noqa: F401  # the fixture

pytestmark = [pytest.mark.browser, requires_chromium]

SAVED_CELLS = [
    "%load_ext dispynb\n%dispy local --cpus 2",
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

#: Whether each run snapshot (``.dispynb-run-progress``) holds its label and bar.
LAID_OUT = """() => [...document.querySelectorAll('.jp-Cell .dispynb-run-progress')]
    .map(e => {
        const box = e.getBoundingClientRect();
        const bar = e.lastElementChild.getBoundingClientRect();
        return bar.height > 0 && bar.bottom <= box.bottom + 1
            && getComputedStyle(e).backgroundColor === 'rgba(0, 0, 0, 0)';
    })"""


@pytest.mark.timeout(180)
def test_lab_saved_notebook_opened_again(lab: Lab) -> None:  # noqa: F811
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in SAVED_CELLS]
    path = lab.root / "saved.ipynb"
    nbformat.write(nb, path)
    with chromium_page(viewport={"width": 1200, "height": 1400}) as page:
        open_notebook(page, lab, "saved.ipynb", "Python 3 (ipykernel)")
        for index in range(len(SAVED_CELLS)):
            run_cell(page, index)
            wait_prompt(page, index, f"[{index + 1}]:")
        cells = page.locator(".jp-NotebookPanel .jp-Cell")
        status = cells.nth(3).locator(".jp-OutputArea").inner_text()
        assert "mixed 3/4 done, 1 failed" in status, status
        assert page.evaluate(LAID_OUT) == [True] * 4  # 2 bars, 2 runs in the status

        page.keyboard.press("Control+s")
        deadline = time.monotonic() + 30
        while "hello from 1" not in path.read_text():
            assert time.monotonic() < deadline, "the notebook was not saved"
            time.sleep(0.1)
        page.reload()
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content")
        cells.nth(3).locator(".dispynb-session-status").wait_for()
        outputs = [
            cells.nth(i).locator(".jp-OutputArea").inner_text()
            for i in range(len(SAVED_CELLS))
        ]
        # Before: "Error displaying widget: model not found" for both runs, and the
        # nowait run's printed lines and traceback gone with its Output widget.
        assert not any("Error displaying widget" in text for text in outputs), outputs
        assert "mixed 3/4 done, 1 failed" in outputs[1], outputs[1]
        assert "ValueError: 3" in outputs[1], outputs[1]
        assert "later 1/2 done, 1 failed" in outputs[2], outputs[2]
        assert "hello from 0" in outputs[2] and "hello from 1" in outputs[2]
        assert "KeyError: 'missing'" in outputs[2], outputs[2]
        assert page.evaluate(LAID_OUT) == [True] * 4
