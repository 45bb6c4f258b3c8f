"""``%dispy scheduler HOST --secret-file CREDENTIAL``: notebook runs through a
dispynb-scheduler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

from dispynb import LocalCluster
from tests.sharedsched.harness import SchedulerProcess, start_tls_scheduler

pytestmark = pytest.mark.slow


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    try:
        yield shell
    finally:
        shell.run_line_magic("dispy", "close")
        shell.run_line_magic("unload_ext", "dispynb")


def test_dispy_scheduler_runs_cells_on_the_shared_nodes(
    ip: InteractiveShell, scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    with capture_output() as shown:
        ip.run_line_magic(
            "dispy", f"scheduler {scheduler.address} --secret-file {users['bob']}"
        )
    assert "scheduler engine" in shown.stdout and scheduler.address in shown.stdout
    with capture_output():
        ip.run_cell_magic(
            "dispy",
            '--over "range(8)" --into run',
            "def square(x):\n    return x * x\n",
        )
    assert ip.user_ns["run"].results == [x * x for x in range(8)]
    scheduler.wait_for_log("user 'bob' connected")


def test_dispy_scheduler_reaches_a_tls_scheduler_with_cafile(
    ip: InteractiveShell,
    tmp_path: Path,
    nodes: LocalCluster,
    users: dict[str, Path],
) -> None:
    """``%dispy scheduler HOST --secret-file C --cafile CA``: a scheduler started
    with ``--cluster_certfile``. The magic dropped ``--cafile``, so the run was
    refused for want of the cafile= it was given."""
    sched, cert = start_tls_scheduler(tmp_path, nodes.node_specs(), nodes.secret)
    try:
        with capture_output():
            ip.run_line_magic(
                "dispy",
                f"scheduler {sched.address} --secret-file {users['alice']} "
                f"--cafile {cert}",
            )
            ip.run_cell_magic(
                "dispy", '--over "range(4)" --into run', "def neg(x):\n    return -x\n"
            )
        assert ip.user_ns["run"].results == [0, -1, -2, -3]
    finally:
        sched.stop()
