"""The JupyterLab extension in a real browser: a `jupyter lab` server, its kernel, the
kernel's local nodes and Debian's Chromium (Playwright), all inside a private network
namespace (`unshare -n`, loopback only), so nothing leaves 127.0.0.1.

The test re-runs itself under ``unshare -n`` (pytest in the namespace, with
``DISPYNB_IN_NETNS=1``); the outer test only checks that the inner run passed.
``DISPYNB_SCREENSHOTS=1`` saves ``docs/labextension.png`` and ``docs/lab-stop.png``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser import chromium_page, requires_chromium
from tests.labextension.labpage import (
    ACTIVE,
    PANEL,
    TAB,
    Lab,
    card_counts,
    insert_and_check,
    kernel_connections,
    kernel_status,
    open_notebook,
    prompt,
    restart_kernel,
    run_cell,
    run_the_next_cells,
    subshells,
    wait_counts,
    wait_prompt,
)
from tests.nodeproc import inner_pytest
from tests.ports import PortHolder

if TYPE_CHECKING:
    pass

pytestmark = [pytest.mark.browser, requires_chromium]

ROOT = Path(__file__).resolve().parents[2]
IN_NETNS = os.environ.get("DISPYNB_IN_NETNS") == "1"
LAB_EXTENSION = Path(sys.prefix, "share/jupyter/labextensions/dispynb-labextension")

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


#: The same journey on the Dask engine: a Dask LocalCluster of two one-thread workers
#: (``%dispy local --engine dask``), a %%dispy run the sidebar follows, then Stop.
DASK_CELLS = [
    "%load_ext dispynb\n%dispy local --engine dask --nodes 2 --cpus 1",
    '%%dispy --over "range(30)" --into slow\n'
    "def slow(i):\n"
    "    import time\n"
    "    time.sleep(1)\n"
    "    return i",
]


#: The journey on a Ray cluster (``ray start --head`` in the test's namespaces, its
#: address put in for ``{address}``): ``%dispy ray ADDRESS``, then a %%dispy run.
RAY_CELLS = [
    "%load_ext dispynb\n%dispy ray {address}",
    '%%dispy --over "range(30)" --into slow\n'
    "def slow(i):\n"
    "    import time\n"
    "    time.sleep(1)\n"
    "    return i",
]


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(
        ["unshare", "-n", "ip", "link", "set", "lo", "up"],
        capture_output=True,
        timeout=20,
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.decode().strip()}"
    return None


def _sources_newer_than(built: Path) -> Path | None:
    """A source of the extension changed after ``built`` was installed, if any (the
    rule ./dev follows to rebuild it)."""
    since = built.stat().st_mtime
    sources = ROOT / "labextension"
    for path in (
        sources / "package.json",
        *sources.glob("src/**/*"),
        *sources.glob("style/**/*"),
    ):
        if path.is_file() and path.stat().st_mtime > since:
            return path.relative_to(ROOT)
    return None


@pytest.mark.timeout(600)
@pytest.mark.skipif(IN_NETNS, reason="the outer half runs outside the namespace")
def test_lab_panel_in_private_network() -> None:
    """Run the lab tests in private network and PID namespaces; they must pass."""
    reason = _can_unshare()
    if reason is not None:
        pytest.skip(reason)
    assert LAB_EXTENSION.joinpath("package.json").exists(), (
        f"the extension is not installed in {LAB_EXTENSION}: run ./dev test (or "
        "pip install -e .) to build and install it"
    )
    newer = _sources_newer_than(LAB_EXTENSION / "package.json")
    assert not newer, (
        f"{newer} changed after the extension in {LAB_EXTENSION} was built: the "
        "browser would run the old panel; run ./dev test (it rebuilds) or "
        "pip install -e ."
    )
    here = Path(__file__).relative_to(ROOT)
    tests = [
        f"{here}::test_lab_panel",
        f"{here}::test_lab_stop",
        f"{here}::test_lab_page_opened_while_a_cell_runs",
        f"{here}::test_lab_outcomes_as_the_cell_says",
        f"{here.parent / 'test_lab_saved.py'}::test_lab_saved_notebook_opened_again",
    ]
    if importlib.util.find_spec("distributed") is not None:
        tests.append(f"{here}::test_lab_dask")
    inner = inner_pytest(*tests)
    # A PID namespace too, with sh as its PID 1 (no exec): if the inner pytest is
    # killed (this timeout, an interrupted run), its node, Jupyter server, kernels
    # and browser end with the namespace instead of running on as orphans.
    proc = subprocess.run(
        [
            "unshare", "-n", "-p", "-f", "--kill-child", "--mount-proc",
            "sh", "-c", 'ip link set lo up && "$@"; exit $?', "sh", *inner,
        ],
        env={**os.environ, "DISPYNB_IN_NETNS": "1"},
        capture_output=True,
        text=True,
        timeout=560,
    )  # fmt: skip
    assert proc.returncode == 0, f"inner run failed:\n{proc.stdout}\n{proc.stderr}"
    assert f"{len(tests)} passed" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.timeout(500)
@pytest.mark.skipif(IN_NETNS, reason="the outer half runs outside the namespace")
def test_lab_ray_in_private_network() -> None:
    """Run `test_lab_ray` in private network and PID namespaces (Ray's daemons end
    with the namespace, and ``ray stop`` there sees only them); it must pass."""
    reason = _can_unshare()
    if reason is not None:
        pytest.skip(reason)
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed: pip install 'dispynb[ray]' (or .[test])")
    here = Path(__file__).relative_to(ROOT)
    inner = inner_pytest(f"{here}::test_lab_ray")
    # sh stays PID 1 of the namespace (no exec): Ray's daemons are its orphans.
    proc = subprocess.run(
        [
            "unshare", "-n", "-p", "-f", "--kill-child", "--mount-proc",
            "sh", "-c", 'ip link set lo up && "$@"; exit $?', "sh", *inner,
        ],
        env={**os.environ, "DISPYNB_IN_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=480,
    )  # fmt: skip
    assert proc.returncode == 0, f"inner run failed:\n{proc.stdout}\n{proc.stderr}"
    assert "1 passed" in proc.stdout, proc.stdout


# -- the inner half (in the namespace) -------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path, held_port: PortHolder) -> Iterator[Lab]:
    """A `jupyter lab` server on 127.0.0.1 with isolated config, data and runtime."""
    import nbformat

    root, jdir = tmp_path / "root", Path(tempfile.mkdtemp(prefix="dispynb-jlab-"))
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(FIRST_CELL)]
    nbformat.write(nb, root / "lab.ipynb")
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in STOP_CELLS]
    nbformat.write(nb, root / "stop.ipynb")
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in REOPEN_CELLS]
    nbformat.write(nb, root / "reopen.ipynb")
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in OUTCOME_CELLS]
    nbformat.write(nb, root / "outcomes.ipynb")
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in DASK_CELLS]
    nbformat.write(nb, root / "dask.ipynb")
    # A kernel in which dispynb cannot be imported, as if it were not installed.
    spec = jdir / "data/kernels/nodispynb"
    spec.mkdir(parents=True)
    hide = "import sys; sys.modules['dispynb'] = None; "
    launch = "from ipykernel import kernelapp; kernelapp.launch_new_instance()"
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [
                    sys.executable,
                    "-c",
                    hide + launch,
                    "-f",
                    "{connection_file}",
                ],
                "display_name": "No dispynb",
                "language": "python",
            }
        )
    )
    plain = nbformat.v4.new_notebook()
    plain.metadata["kernelspec"] = {
        "name": "nodispynb",
        "display_name": "No dispynb",
        "language": "python",
    }
    nbformat.write(plain, root / "plain.ipynb")
    (jdir / "cfg/labconfig").mkdir(parents=True)
    (jdir / "cfg/labconfig/page_config.json").write_text(
        json.dumps(
            {
                "disabledExtensions": {
                    "@jupyterlab/apputils-extension:announcements": True
                }
            }
        )
    )
    # A node server with discovery on (it announces itself only on loopback here).
    secret = jdir / "secret"
    secret.write_text("lab-extension-test-secret-0123456789")
    secret.chmod(0o600)
    node = subprocess.Popen(
        [
            sys.executable, "-m", "nodeserver", "--host", "127.0.0.1", "--port", "0",
            "--discovery", "--secret-file", str(secret), "--name", "found-node",
            "--cpus", "1", "--port-file", str(jdir / "node.port"),
            "--dest-path", str(jdir / "node"), "--loglevel", "warning",
        ],
    )  # fmt: skip
    # Held until the end: Jupyter binds it with SO_REUSEADDR (tornado's), twice
    # (it checks the port first), and nothing else gets it between (tests.ports).
    port, token = held_port(), "dispynb-test-token"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(jdir / "cfg"),
        "JUPYTER_DATA_DIR": str(jdir / "data"),
        "JUPYTER_RUNTIME_DIR": str(jdir / "rt"),
        "IPYTHONDIR": str(jdir / "ipython"),
    }
    log = open(jdir / "jupyter.log", "w")  # noqa: SIM115  # closed below
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
            "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            f"--LabApp.workspaces_dir={jdir / 'ws'}",
            f"--LabApp.user_settings_dir={jdir / 'settings'}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    port_file = jdir / "node.port"
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert node.poll() is None and time.monotonic() < deadline, "no node"
            time.sleep(0.1)
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "jupyter lab did not start:\n"
                        + (jdir / "jupyter.log").read_text()
                    ) from None
                time.sleep(0.2)
        yield Lab(url, token, root, int(port_file.read_text()), secret, jdir / "rt")
    finally:
        for proc in (server, node):  # the server shuts its kernels down first
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        shutil.rmtree(jdir, ignore_errors=True)


@pytest.mark.timeout(180)
def test_lab_panel(lab: Lab) -> None:  # collected only in the namespace: conftest.py
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=60_000
    ) as page:
        page.goto(f"{lab.url}/lab?token={lab.token}")
        page.wait_for_selector(".jp-Launcher", state="visible")

        # No notebook yet: the panel says so.
        page.locator(TAB).click()
        status = page.locator(f"{PANEL} .dispynb-status-text")
        assert "Open a notebook" in status.inner_text(timeout=30_000)

        page.goto(f"{lab.url}/lab/tree/lab.ipynb?token={lab.token}")
        page.wait_for_selector(
            ".jp-NotebookPanel .jp-Cell .cm-content", state="visible"
        )
        page.wait_for_function(
            """() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
                .some(e => e.textContent.trim() === 'Python 3 (ipykernel) | Idle')"""
        )
        if not page.locator(PANEL).is_visible():
            page.locator(TAB).click()
        # The panel bootstrapped the kernel side silently: no output, no prompt number.
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
        assert "No clusters" in page.locator(f"{PANEL} .dispynb-clusters").inner_text()
        prompt = page.locator(".jp-Cell .jp-InputPrompt").first
        assert prompt.inner_text().strip() == "[ ]:"

        page.locator(".jp-NotebookPanel .jp-Cell").first.locator(".cm-content").click()
        page.keyboard.press("Shift+Enter")

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
        # (A cluster of no run: its running jobs, terminated, count as failed.)
        counts = card_counts(page)
        assert counts.get("cancelled", 0) + counts.get("failed", 0) > 100, counts
        assert (
            counts["done"] + counts.get("cancelled", 0) + counts.get("failed", 0) == 200
        ), counts
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

        # ... Discover at an address: the node answers; then code that connects to it.
        page.locator(f"{PANEL} .dispynb-addresses").fill("127.0.0.1")
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


@pytest.mark.timeout(300)
def test_lab_stop(lab: Lab) -> None:  # collected only in the namespace: conftest.py
    """Stop (the toolbar button) in a %%dispy cell: the cell returns at once, its jobs
    are cancelled, the %dispy local nodes keep serving the next cells; the sidebar
    shows no phantom cluster and where the closed runs ran."""
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=60_000
    ) as page:
        open_notebook(page, lab, "stop.ipynb", "Python 3 (ipykernel)")
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
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
        page.locator(
            '.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"]'
        ).click()
        wait_prompt(page, 1, "[2]:")
        returned = time.monotonic() - pressed
        output = cells.nth(1).locator(".jp-OutputArea").inner_text()
        stopped = "KeyboardInterrupt: Interrupted: run 'slow' stopped, 40 cancelled, 2 "
        assert stopped in output, output
        assert "Traceback" not in output and "dispynb/" not in output, output
        print(f"Stop click to prompt [2]: {returned:.2f} s")
        assert returned < 10, returned

        # The closed card: no Cancel button, the node it ran on (released), not
        # "no nodes connected yet"; counts: cancelled, nothing failed (the running
        # jobs it stopped too, as the cell counts them).
        closed = page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]')
        closed.first.wait_for()
        assert closed.locator(".dispynb-cluster-name").inner_text() == "slow (closed)"
        assert not closed.locator(".dispynb-cancel").is_visible()
        node = closed.locator(".dispynb-node")
        assert node.count() == 1 and node.get_attribute("data-released") == "true"
        assert "no nodes connected yet" not in closed.inner_text()
        statuses = closed.locator(".dispynb-count").evaluate_all(
            "es => es.map(e => e.dataset.status)"
        )
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


@pytest.mark.timeout(200)
def test_lab_page_opened_while_a_cell_runs(lab: Lab) -> None:  # in the namespace
    """A page opened (here: reloaded) while a long %%dispy cell runs, as a person
    closes the tab and comes back: the kernel answers nothing on its main shell
    until the cell ends (JupyterLab's kernel_info waits there too), so the panel
    said 'a running cell holds it' for the rest of the run. It now asks on the
    control channel and connects on a kernel subshell: the run's card shows while
    the cell runs, and its Cancel ends the run; the next cells work."""
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=60_000
    ) as page:
        open_notebook(page, lab, "reopen.ipynb", "Python 3 (ipykernel)")
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
        run_cell(page, 0)
        wait_prompt(page, 0, "[1]:")
        run_cell(page, 1)
        page.locator(f"{PANEL} .dispynb-cluster").first.wait_for()
        wait_counts(page, "c.running === 2")
        before = set(subshells(lab))  # JupyterLab's own, for the comms

        page.reload()
        page.locator(TAB).wait_for()
        if not page.locator(PANEL).is_visible():
            page.locator(TAB).click()
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
        card = page.locator(f'{PANEL} .dispynb-cluster[data-closed="false"]')
        card.wait_for()
        assert card.locator(".dispynb-cluster-name").inner_text() == "slow"
        wait_counts(page, "c.total === 60 && c.running > 0")
        assert card_counts(page)["ended"] < 60  # connected while the cell runs

        # Reloaded again: the page deletes its subshell as it goes, and the new page
        # makes one of its own (the kernel kept one per page: a thread each).
        (first,) = set(subshells(lab)) - before  # the panel's
        page.reload()
        page.locator(TAB).wait_for()
        if not page.locator(PANEL).is_visible():
            page.locator(TAB).click()
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
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


@pytest.mark.timeout(300)
def test_lab_outcomes_as_the_cell_says(lab: Lab) -> None:  # in the namespace
    """A run with finished, failed and cancelled jobs: the card's chips name and
    count them as the cell's summary line does, its progress says done as the cell,
    and the node's line says how many jobs ended on it (not 'done': cancelled and
    failed ones are among them)."""
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=60_000
    ) as page:
        open_notebook(page, lab, "outcomes.ipynb", "Python 3 (ipykernel)")
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
        cells = page.locator(".jp-NotebookPanel .jp-Cell")
        run_cell(page, 0)
        wait_prompt(page, 0, "[1]:")
        run_cell(page, 1)
        card = page.locator(f"{PANEL} .dispynb-cluster")
        card.first.wait_for()
        # Jobs 0-5 ended (2 raised), 6 and 7 sleep on the node's 2 CPUs, 4 queued.
        wait_counts(page, "c.running === 2 && c.ended === 6 && c.queued === 4")
        card.locator(".dispynb-cancel").click()
        wait_prompt(page, 1, "[2]:")

        output = cells.nth(1).locator(".jp-OutputArea").inner_text()
        line = re.search(r"(\d+)/12 done, (\d+) failed, (\d+) cancelled", output)
        assert line, output
        said = dict(
            zip(("done", "failed", "cancelled"), map(int, line.groups()), strict=True)
        )
        assert said == {"done": 4, "failed": 2, "cancelled": 6}, output

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
        assert shown == said, (shown, output)
        assert chips.all_inner_texts() == ["4 done", "2 failed", "6 cancelled"]
        assert closed.locator(".dispynb-progress-text").inner_text() == "4/12 done"
        assert closed.get_attribute("data-ended") == "12"
        # Every job was sent to the one node (the queued ones wait in its queue) and
        # ended there: 12 ended, not '12 done' beside the card's '4/12 done'.
        node = closed.locator(".dispynb-node")
        assert node.count() == 1
        info = node.locator(".dispynb-node-info").inner_text()
        assert node.get_attribute("data-ended") == "12", info
        assert "12 ended" in info and "done" not in info, info


@pytest.mark.timeout(300)
def test_lab_dask(lab: Lab) -> None:  # collected only in the namespace: conftest.py
    """The sidebar follows a %%dispy run on the Dask engine: its cluster card shows
    the two Dask workers and the counts moving; Stop ends the run."""
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=60_000
    ) as page:
        open_notebook(page, lab, "dask.ipynb", "Python 3 (ipykernel)")
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
        cells = page.locator(".jp-NotebookPanel .jp-Cell")
        run_cell(page, 0)
        wait_prompt(page, 0, "[1]:")
        assert "dispynb: dask engine: local Dask cluster tcp://127.0.0.1:" in (
            cells.nth(0).inner_text()
        )

        run_cell(page, 1)
        card = page.locator(f"{PANEL} .dispynb-cluster")
        card.first.wait_for()
        assert card.locator(".dispynb-cluster-name").inner_text() == "slow"
        nodes = card.locator(".dispynb-node")
        page.wait_for_function(
            """() => document.querySelectorAll(
                '#dispynb-sidebar .dispynb-cluster .dispynb-node').length === 2"""
        )
        for i in range(2):
            address = nodes.nth(i).get_attribute("data-address") or ""
            assert address.startswith("tcp://127.0.0.1:"), address  # a Dask worker
            assert nodes.nth(i).get_attribute("data-cpus") == "1"
            # Dask's workers report no load: unknown, not 'not reported yet'
            # (as if it would come).
            info = nodes.nth(i).locator(".dispynb-node-info").inner_text()
            assert info.startswith("1 CPU · ") and info.endswith("· load unknown"), info
        wait_counts(page, "c.total === 30 && c.running === 2")
        first = card_counts(page)
        wait_counts(page, f"c.ended >= {first['ended'] + 2}")

        page.locator(
            '.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"]'
        ).click()
        wait_prompt(page, 1, "[2]:")
        output = cells.nth(1).locator(".jp-OutputArea").inner_text()
        assert "Interrupted: run 'slow' stopped" in output, output
        closed = page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]')
        closed.first.wait_for()
        statuses = closed.locator(".dispynb-count").evaluate_all(
            "es => es.map(e => e.dataset.status)"
        )
        assert "cancelled" in statuses and "failed" not in statuses, statuses


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A Ray cluster (``ray start --head``, 2 CPUs) in the test's namespaces; its
    token in this process's environment, which `lab` (hence its kernels) inherits,
    as a user exports it. Its address."""
    from tests.backends.rayhead import RayHead

    head = RayHead.start(cpus=2)
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update({name: head.env[name] for name in saved})
    try:
        yield head.address
    finally:
        head.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.mark.timeout(450)
def test_lab_ray(ray_head: str, lab: Lab) -> None:  # only in the namespace: conftest.py
    """The sidebar follows a %%dispy run on the Ray engine: its cluster card shows
    the Ray node with its 2 CPUs and the counts moving; Stop ends the run."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_code_cell(cell.replace("{address}", ray_head))
        for cell in RAY_CELLS
    ]
    nbformat.write(nb, lab.root / "ray.ipynb")
    with chromium_page(
        viewport={"width": 1400, "height": 850}, timeout_ms=120_000
    ) as page:
        open_notebook(page, lab, "ray.ipynb", "Python 3 (ipykernel)")
        page.wait_for_selector(f'{PANEL}[data-ready="true"]')
        cells = page.locator(".jp-NotebookPanel .jp-Cell")
        run_cell(page, 0)
        wait_prompt(page, 0, "[1]:")
        assert f"dispynb: ray engine: {ray_head}" in cells.nth(0).inner_text(), (
            cells.nth(0).inner_text()
        )

        run_cell(page, 1)
        card = page.locator(f"{PANEL} .dispynb-cluster")
        card.first.wait_for()
        assert card.locator(".dispynb-cluster-name").inner_text() == "slow"
        node = card.locator(".dispynb-node")
        node.first.wait_for()
        assert node.count() == 1  # the head, the one Ray node
        assert node.first.get_attribute("data-cpus") == "2"
        wait_counts(page, "c.total === 30 && c.running === 2")
        first = card_counts(page)
        wait_counts(page, f"c.ended >= {first['ended'] + 2}")

        page.locator(
            '.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"]'
        ).click()
        wait_prompt(page, 1, "[2]:")
        output = cells.nth(1).locator(".jp-OutputArea").inner_text()
        assert "Interrupted: run 'slow' stopped" in output, output
        closed = page.locator(f'{PANEL} .dispynb-cluster[data-closed="true"]')
        closed.first.wait_for()
        statuses = closed.locator(".dispynb-count").evaluate_all(
            "es => es.map(e => e.dataset.status)"
        )
        assert "cancelled" in statuses and "failed" not in statuses, statuses
