"""The browser tests' JupyterLab server (the `lab` fixture), and which of them are
collected where.

`test_lab_browser.test_lab_panel_in_private_network` re-runs pytest under
``unshare -n`` on the tests of this folder that use `lab` (`INNER`); outside the
namespace, those are deselected (not reported as skipped: they do run, in the inner
pytest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.labextension.labpage import Lab, write_notebook
from tests.ports import PortHolder

INNER = (
    "test_lab_panel.py::test_lab_panel",
    "test_lab_panel.py::test_lab_page_opened_while_a_cell_runs",
    "test_lab_panel.py::test_lab_page_reloaded_during_a_nowait_run",
    "test_lab_panel.py::test_lab_node_lost_under_a_run",
    "test_lab_panel.py::test_lab_run_starting_on_its_nodes",
    "test_lab_panel.py::test_lab_kernel_busy_while_a_cell_runs",
    "test_lab_stop.py::test_lab_stop",
    "test_lab_stop.py::test_lab_outcomes_as_the_cell_says",
    "test_lab_engines.py::test_lab_dask",
    "test_lab_engines.py::test_lab_ray",
    "test_lab_saved.py::test_lab_saved_notebook_opened_again",
)


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if os.environ.get("DISPYNB_IN_NETNS") == "1":
        return
    inner = [item for item in items if item.nodeid.endswith(INNER)]
    if inner:
        config.hook.pytest_deselected(items=inner)
        items[:] = [item for item in items if item not in inner]


@pytest.fixture
def lab(tmp_path: Path, held_port: PortHolder) -> Iterator[Lab]:
    """A `jupyter lab` server on 127.0.0.1 with isolated config, data and runtime
    (each test writes its notebooks into ``lab.root``: `write_notebook`), a node
    server answering discovery, and a kernel without dispynb (``plain.ipynb``)."""
    root, jdir = tmp_path / "root", Path(tempfile.mkdtemp(prefix="dispynb-jlab-"))
    root.mkdir()
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
    write_notebook(root, "plain.ipynb", [], kernel=("nodispynb", "No dispynb"))
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
