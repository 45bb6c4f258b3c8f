"""The systemd units that docs/howto/deploy-nodes.md gives, for a node service and for
a scheduler service, are ones systemd takes, and stopping them does what the page
says: the node drains, so a running job finishes; the scheduler stops within its
``TimeoutStopSec=``, telling its users why their running jobs end.

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


#: The programs the page gives a unit for, and how the tests run them.
PROGRAMS = {
    "dispynb-node": [sys.executable, "-m", "nodeserver"],
    "dispynb-scheduler": [sys.executable, "-m", "schedserver"],
}


def _units() -> dict[str, str]:
    """The page's unit files (its ```ini blocks with a [Service] section), by the
    name of the program each starts."""
    blocks = re.findall(r"```ini\n(.*?)```", PAGE.read_text(), re.S)
    units = {}
    for block in blocks:
        if "[Service]" in block:
            start = re.search(r"^ExecStart=(\S+)", block, re.M)
            assert start, f"a unit on {PAGE.name} has no ExecStart=:\n{block}"
            units[Path(start[1]).name] = block
    return units


def _unit_text(program: str) -> str:
    return _units()[program]


def _service(program: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # Keys as written
    parser.read_string(_unit_text(program))
    return parser["Service"]


def test_the_page_gives_a_unit_for_the_node_and_one_for_the_scheduler() -> None:
    assert sorted(_units()) == sorted(PROGRAMS), f"{PAGE.name}: {sorted(_units())}"


def _stop_as_systemd(pid: int, service: configparser.SectionProxy) -> None:
    """SIGTERM as ``systemctl stop`` sends it for the unit's ``KillMode=``."""
    main = psutil.Process(pid)
    unit = [main]
    if service.get("KillMode", "control-group") == "control-group":
        unit += main.children(recursive=True)
    for proc in unit:
        proc.send_signal(signal.SIGTERM)


def _slow(n: int) -> int:
    import time

    time.sleep(3)
    return n


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_the_pages_unit_is_one_systemd_takes(tmp_path: Path, program: str) -> None:
    """``systemd-analyze verify`` finds nothing wrong in it (its program replaced
    by this checkout's, which must exist for the check)."""
    path = Path(sys.executable).parent / program
    text = re.sub(r"ExecStart=\S+", f"ExecStart={path}", _unit_text(program))
    unit = tmp_path / f"{program}.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert unit.name not in done.stderr, done.stderr


def test_stopping_the_pages_unit_lets_a_running_job_finish(tmp_path: Path) -> None:
    """``systemctl stop`` with the page's unit: the running job finishes (the
    node drains), as the unit's comment promises, instead of being killed with
    its worker."""
    service = _service("dispynb-node")
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(_slow, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        job = cluster.submit(7)
        wait_until(lambda: job.status == DispyJob.Running)
        _stop_as_systemd(node.proc.pid, service)
        assert cluster.wait(timeout=30)
        assert job.result == 7, job.exception
        assert job.status == DispyJob.Finished
        assert node.proc.wait(float(service["TimeoutStopSec"])) == 0


#: Run by ``sh -c`` in a new network namespace: loopback up, then the command.
_LO_UP = 'ip link set lo up && exec "$@"'


@pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (util-linux, iproute2) for a network namespace",
)
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_the_pages_unit_restarts_what_may_pass_not_a_setting_that_cannot_work(
    tmp_path: Path, program: str
) -> None:
    """With ``Restart=on-failure`` alone, a node whose secret file is missing (exit
    2) was restarted every 5 s for ever, its one error line buried in the journal;
    an address not up yet at boot (exit 1) is what the restarts are for. The
    scheduler's unit likewise."""
    from tests.nodeproc import NODE_WAIT, node_env

    service = _service(program)
    assert service["Restart"] == "on-failure"
    prevented = service.get("RestartPreventExitStatus", "").split()
    if program == "dispynb-node":
        secret_option = "--secret-file"
        # No discovery, nothing sent: only whether it can listen.
        rest = ["--no-discovery", "--dest-path", str(tmp_path / "dest")]
    else:
        secret_option = "--node_secret_file"
        # Nodes only by registration: no discovery, nothing sent.
        rest = ["--register_port", "0", "--users", str(tmp_path / "users")]
        rest += ["--dest_path_prefix", str(tmp_path / "spill")]

    def exit_status(*args: str, isolated: bool = False) -> int:
        # In a network namespace of its own (lo only) no address but loopback's
        # is up, whatever this machine's interfaces have.
        isolation = ["unshare", "-rn", "sh", "-c", _LO_UP, "sh"] if isolated else []
        return subprocess.run(
            [*isolation, *PROGRAMS[program], *args, *rest],
            env=node_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=NODE_WAIT,
        ).returncode

    setting = exit_status(secret_option, str(tmp_path / "missing"))
    secret = tmp_path / "secret"
    secret.write_text("a-secret-long-enough-for-a-network-address-0123456789\n")
    secret.chmod(0o600)
    # An address on no interface, as before the network is up at boot: TEST-NET-1
    # may well be on one of this machine's (bind sends nothing).
    transient = exit_status(
        "-i", "192.0.2.1", secret_option, str(secret), isolated=True
    )
    assert (setting, transient) == (2, 1)
    assert str(setting) in prevented, service.get("RestartPreventExitStatus")
    assert str(transient) not in prevented


def test_stopping_the_pages_scheduler_unit_ends_it_in_time_telling_its_users(
    tmp_path: Path,
) -> None:
    """``systemctl stop`` with the page's scheduler unit while a user's job runs:
    the scheduler exits 0 within ``TimeoutStopSec=`` (systemd would kill it
    after), and the job ends saying that the scheduler stopped, as the unit's
    comment says."""
    from dispynb import LocalCluster, SharedJobCluster
    from tests.sharedsched.harness import SchedulerProcess, add_user

    service = _service("dispynb-scheduler")
    credential = add_user(tmp_path, "alice")
    with LocalCluster(nodes=1, cpus=1) as nodes:
        scheduler = SchedulerProcess(tmp_path, nodes.node_specs(), nodes.secret)
        cluster = SharedJobCluster(
            _slow, scheduler_host=scheduler.start().address, secret_file=str(credential)
        )
        try:
            job = cluster.submit(7)
            wait_until(lambda: job.status == DispyJob.Running)
            assert scheduler.proc is not None
            _stop_as_systemd(scheduler.proc.pid, service)
            status = scheduler.proc.wait(float(service["TimeoutStopSec"]))
            assert status == 0, scheduler.log_text()
            assert cluster.wait(timeout=30)
            assert job.status == DispyJob.Abandoned
            assert "the scheduler is shutting down (SIGTERM)" in str(job.exception)
        finally:
            cluster.close(timeout=10, terminate=True)
            scheduler.stop()
