"""The JupyterLab page of the browser tests (`test_lab_browser`): the `Lab` server
a test runs against (the `lab` fixture of conftest.py), the notebooks it writes
there, and what a user does and reads on its page (Playwright)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.browser import chromium_page

if TYPE_CHECKING:
    from playwright.sync_api import Page

#: The checkout (where DISPYNB_SCREENSHOTS=1 saves docs/*.png).
ROOT = Path(__file__).resolve().parents[2]
#: The kernel the test notebooks run on (the venv's ipykernel).
KERNEL = "Python 3 (ipykernel)"
PANEL = "#dispynb-sidebar"
ACTIVE = ".jp-NotebookPanel .jp-Cell.jp-mod-active"
TAB = '.jp-SideBar.jp-mod-left li.lm-TabBar-tab[data-id="dispynb-sidebar"]'


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    node_port: int  # TCP port of a node server answering discovery on 127.0.0.1
    secret_file: Path  # that node's secret
    runtime: Path  # JUPYTER_RUNTIME_DIR: the kernels' connection files


def write_notebook(
    root: Path,
    name: str,
    cells: list[str],
    kernel: tuple[str, str] = ("python3", KERNEL),
) -> Path:
    """Write notebook ``name`` of code ``cells`` (none run) into ``root``, for the
    ``kernel`` (its name, its display name); its path."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": kernel[0],
        "display_name": kernel[1],
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in cells]
    nbformat.write(nb, root / name)
    return root / name


def wait_kernel_idle(page: Page, kernel: str = KERNEL) -> None:
    """Wait until the status bar says the notebook's ``kernel`` is idle."""
    page.wait_for_function(
        """kernel => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
            .some(e => e.textContent.trim() === kernel + ' | Idle')""",
        arg=kernel,
    )


def show_panel(page: Page) -> None:
    """Open the dispynb sidebar (its tab) unless it shows already."""
    page.locator(TAB).wait_for()
    if not page.locator(PANEL).is_visible():
        page.locator(TAB).click()


def open_notebook(page: Page, lab: Lab, name: str, kernel: str = KERNEL) -> None:
    """Open a notebook and wait until its kernel is really connected and idle."""
    page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content", state="visible")
    wait_kernel_idle(page, kernel)
    show_panel(page)


def wait_panel_ready(page: Page) -> None:
    """Wait until the sidebar is connected to the notebook's kernel."""
    page.wait_for_selector(f'{PANEL}[data-ready="true"]')


def reload_page(page: Page) -> None:
    """Reload the page, as a person comes back to the tab; wait for the sidebar to
    connect again."""
    page.reload()
    show_panel(page)
    wait_panel_ready(page)


@contextmanager
def notebook_page(
    lab: Lab, name: str, cells: list[str], timeout_ms: int = 60_000
) -> Iterator[Page]:
    """Write notebook ``name`` of ``cells``, open it in a fresh Chromium (1400x850)
    and yield the page once the sidebar is connected to its kernel."""
    write_notebook(lab.root, name, cells)
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=timeout_ms
    ) as page:
        open_notebook(page, lab, name)
        wait_panel_ready(page)
        yield page


def insert_and_check(page: Page, expected: str) -> None:
    """Press Insert connect code: a new active cell holding ``expected``."""
    before = page.locator(".jp-NotebookPanel .jp-Cell").count()
    page.locator(f"{PANEL} .dispynb-insert").click()
    page.wait_for_function(
        f"() => document.querySelectorAll('.jp-NotebookPanel .jp-Cell').length"
        f" === {before + 1}"
    )
    active = page.locator(f"{ACTIVE} .cm-content")
    text = active.inner_text()
    assert text.startswith("%load_ext dispynb") and expected in text, text


def card_counts(page: Page) -> dict[str, int]:
    """The counts the panel shows for the (only) cluster: ``ended`` (every job in a
    final status, what fills its bar), ``total``, and each chip by its word, as the
    cell's progress line says it (``done``, ``failed``, ``cancelled``, ``running``,
    ``queued``)."""
    return page.eval_on_selector(
        f"{PANEL} .dispynb-cluster",
        """e => {
            const out = {ended: +e.dataset.ended, total: +e.dataset.total};
            for (const c of e.querySelectorAll('.dispynb-count'))
                out[c.dataset.status] = +c.dataset.count;
            return out;
        }""",
    )


def wait_counts(page: Page, condition: str) -> None:
    """Wait until the cluster card's counts satisfy a JS expression over ``c`` (as
    `card_counts`)."""
    page.wait_for_function(
        """cond => {
            const e = document.querySelector('#dispynb-sidebar .dispynb-cluster');
            if (!e) return false;
            const c = {ended: +e.dataset.ended, total: +e.dataset.total};
            for (const x of e.querySelectorAll('.dispynb-count'))
                c[x.dataset.status] = +x.dataset.count;
            return new Function('c', 'return ' + cond)(c);
        }""",
        arg=condition,
    )


def subshells(lab: Lab) -> list[str]:
    """The subshells of the (only) kernel, asked on its control channel, which
    answers while a cell runs."""
    from jupyter_client import BlockingKernelClient

    with urllib.request.urlopen(f"{lab.url}/api/kernels?token={lab.token}") as r:
        (kernel,) = json.load(r)
    client = BlockingKernelClient(
        connection_file=str(lab.runtime / f"kernel-{kernel['id']}.json")
    )
    client.load_connection_file()
    client.start_channels(shell=False, iopub=False, stdin=False, hb=False)
    try:
        msg = client.session.msg("list_subshell_request", {})
        client.control_channel.send(msg)
        while True:
            reply = client.control_channel.get_msg(timeout=10)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return list(reply["content"]["subshell_id"])
    finally:
        client.stop_channels()


def kernel_status(page: Page) -> str:
    """The status bar's kernel item, as ``'Python 3 (ipykernel) | Busy'``."""
    texts = page.eval_on_selector_all(
        ".jp-StatusBar-TextItem", "es => es.map(e => e.textContent.trim())"
    )
    return next((t for t in texts if " | " in t), "")


def kernel_connections(lab: Lab) -> list[int]:
    """How many websockets each running kernel has (Jupyter's REST API)."""
    with urllib.request.urlopen(f"{lab.url}/api/kernels?token={lab.token}") as r:
        return [int(k["connections"]) for k in json.load(r)]


def restart_kernel(page: Page) -> None:
    """Restart the kernel (toolbar); wait until the panel shows the new one's (no
    clusters)."""
    page.locator('.jp-NotebookPanel-toolbar [data-jp-item-name="restart"]').click()
    page.locator(".jp-Dialog .jp-mod-accept").click()
    page.wait_for_function(
        """() => {
            const p = document.querySelector('#dispynb-sidebar');
            return p.dataset.ready === 'true'
                && !p.querySelector('.dispynb-cluster')
                && p.querySelector('.dispynb-clusters').textContent
                    .includes('No clusters');
        }"""
    )


def prompt(page: Page, index: int) -> str:
    return (
        page.locator(".jp-NotebookPanel .jp-Cell .jp-InputPrompt")
        .nth(index)
        .inner_text()
    )


def run_cell(page: Page, index: int) -> None:
    """Click into cell ``index`` and run it (Shift+Enter)."""
    page.locator(".jp-NotebookPanel .jp-Cell").nth(index).locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")


def wait_prompt(page: Page, index: int, text: str) -> None:
    page.wait_for_function(
        """([i, text]) => document.querySelectorAll('.jp-NotebookPanel .jp-Cell')[i]
            .querySelector('.jp-InputPrompt').textContent.trim() === text""",
        arg=[index, text],
    )


def output(page: Page, index: int) -> str:
    """The text of cell ``index``'s output area (with any Output widget's in it)."""
    cell = page.locator(".jp-NotebookPanel .jp-Cell").nth(index)
    return str(cell.locator(".jp-OutputArea").first.inner_text())


def run_and_wait(page: Page, index: int) -> None:
    """Run cell ``index`` and wait until it returned, as the ``index + 1``-th cell
    run (its prompt)."""
    run_cell(page, index)
    wait_prompt(page, index, f"[{index + 1}]:")


def run_the_next_cells(page: Page) -> str:
    """Run cells 2 and 3 (prompts [3] and [4]); what cell 3 printed."""
    run_and_wait(page, 2)
    run_and_wait(page, 3)
    return output(page, 3)


def start_run(page: Page) -> str:
    """Run cell 0 (connect, up to prompt [1]), then start cell 1 (a %%dispy run)
    and wait for its cluster card; what cell 0 printed."""
    run_and_wait(page, 0)
    printed = str(page.locator(".jp-NotebookPanel .jp-Cell").nth(0).inner_text())
    run_cell(page, 1)
    page.locator(f"{PANEL} .dispynb-cluster").first.wait_for()
    return printed


def stop_kernel(page: Page) -> None:
    """Press the notebook toolbar's Stop (interrupt the kernel)."""
    page.locator('.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"]').click()


def closed_statuses(page: Page) -> list[str]:
    """Wait for a closed cluster card; the statuses of its count chips."""
    closed = page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]')
    closed.first.wait_for()
    return list(
        closed.locator(".dispynb-count").evaluate_all(
            "es => es.map(e => e.dataset.status)"
        )
    )


def placeholder_room(page: Page, selector: str) -> dict[str, float]:
    """How wide the placeholder of input ``selector`` is drawn in its font
    (``text``) and how wide the input's content box is (``room``), in pixels: the
    placeholder is cut when ``text > room``."""
    return page.eval_on_selector(
        selector,
        """e => {
            const s = getComputedStyle(e);
            const ctx = document.createElement('canvas').getContext('2d');
            ctx.font = `${s.fontStyle} ${s.fontWeight} ${s.fontSize} ${s.fontFamily}`;
            const pad = parseFloat(s.paddingLeft) + parseFloat(s.paddingRight);
            return {text: ctx.measureText(e.placeholder).width,
                    room: e.clientWidth - pad, placeholder: e.placeholder};
        }""",
    )
