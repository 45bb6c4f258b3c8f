"""The systemd unit that docs/howto/deploy-nodes.md gives for a node service is one
systemd takes, and stopping it does what the page says: SIGTERM drains, so a running
job finishes.

systemd does not run in the tests' machines, so its stop is done here as
systemd.kill(5) describes it for the unit's ``KillMode=``: ``control-group`` (the
default) sends SIGTERM to every process of the unit at once, the node's job workers
included; ``mixed`` sends it to the main process (the node) only, and SIGKILL to what
is left once that exits or ``TimeoutStopSec=`` passes."""

from __future__ import annotations

import configparser
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from tests.jobs import wait_until
from tests.nodeproc import running_node

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "howto" / "deploy-nodes.md"


def _unit_text() -> str:
    """The page's unit file (its ```ini block with a [Service] section)."""
    blocks = re.findall(r"```ini\n(.*?)```", PAGE.read_text(), re.S)
    units = [block for block in blocks if "[Service]" in block]
    assert len(units) == 1, f"{PAGE.name} should give one systemd unit"
    return units[0]


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # Keys as written
    parser.read_string(_unit_text())
    return parser["Service"]


def _slow(n: int) -> int:
    import time

    time.sleep(3)
    return n


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
def test_the_pages_unit_is_one_systemd_takes(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing wrong in it (its program replaced
    by this checkout's, which must exist for the check)."""
    program = Path(sys.executable).parent / "dispynb-node"
    text = re.sub(r"ExecStart=\S+", f"ExecStart={program}", _unit_text())
    unit = tmp_path / "dispynb-node.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "dispynb-node.service" not in done.stderr, done.stderr


def test_stopping_the_pages_unit_lets_a_running_job_finish(tmp_path: Path) -> None:
    """``systemctl stop`` with the page's unit: the running job finishes (the
    node drains), as the unit's comment promises, instead of being killed with
    its worker."""
    service = _service()
    kill_mode = service.get("KillMode", "control-group")
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(_slow, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        job = cluster.submit(7)
        wait_until(lambda: job.status == DispyJob.Running)
        main = psutil.Process(node.proc.pid)
        unit = [main]
        if kill_mode == "control-group":
            unit += main.children(recursive=True)
        for proc in unit:
            proc.send_signal(signal.SIGTERM)
        assert cluster.wait(timeout=30)
        assert job.result == 7, job.exception
        assert job.status == DispyJob.Finished
        assert node.proc.wait(float(service["TimeoutStopSec"])) == 0


def test_the_pages_unit_restarts_what_may_pass_not_a_setting_that_cannot_work(
    tmp_path: Path,
) -> None:
    """With ``Restart=on-failure`` alone, a node whose secret file is missing (exit
    2) was restarted every 5 s for ever, its one error line buried in the journal;
    an address not up yet at boot (exit 1) is what the restarts are for."""
    from tests.nodeproc import NODE_WAIT, node_command, node_env

    service = _service()
    assert service["Restart"] == "on-failure"
    prevented = service.get("RestartPreventExitStatus", "").split()

    def exit_status(*args: str) -> int:
        return subprocess.run(
            node_command(*args, "--dest-path", str(tmp_path / "dest")),
            env=node_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=NODE_WAIT,
        ).returncode

    setting = exit_status("--secret-file", str(tmp_path / "missing"))
    secret = tmp_path / "secret"
    secret.write_text("a-secret-long-enough-for-a-network-address-0123456789\n")
    secret.chmod(0o600)
    # TEST-NET-1: on no interface here (bind sends nothing), as before the network
    # is up at boot.
    transient = exit_status(
        "-i", "192.0.2.1", "--no-discovery", "--secret-file", str(secret)
    )  # fmt: skip
    assert (setting, transient) == (2, 1)
    assert str(setting) in prevented, service.get("RestartPreventExitStatus")
    assert str(transient) not in prevented
