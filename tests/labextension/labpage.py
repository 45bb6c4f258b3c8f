"""The JupyterLab page of the browser tests (`test_lab_browser`): the `Lab` server
a test runs against (the `lab` fixture of conftest.py), the notebooks it writes
there, and what a user does and reads on its page (Playwright)."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

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


def write_notebook(lab: Lab, name: str, cells: list[str]) -> None:
    """Write notebook ``name`` of code ``cells`` (none run) for the Python kernel."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in cells]
    nbformat.write(nb, lab.root / name)


def open_notebook(page: Page, lab: Lab, name: str, kernel: str) -> None:
    """Open a notebook and wait until its kernel is really connected and idle."""
    page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content", state="visible")
    page.wait_for_function(
        """kernel => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
            .some(e => e.textContent.trim() === kernel + ' | Idle')""",
        arg=kernel,
    )
    if not page.locator(PANEL).is_visible():
        page.locator(TAB).click()


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


def run_the_next_cells(page: Page) -> str:
    """Run cells 2 and 3 (prompts [3] and [4]); what cell 3 printed."""
    run_cell(page, 2)
    wait_prompt(page, 2, "[3]:")
    run_cell(page, 3)
    wait_prompt(page, 3, "[4]:")
    cells = page.locator(".jp-NotebookPanel .jp-Cell")
    return str(cells.nth(3).locator(".jp-OutputArea").inner_text())
