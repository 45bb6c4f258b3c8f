"""``dispynb-scheduler --check``: an admin's monitoring asks a running scheduler how
it is, proving the node secret, as no user (no session logged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from tests.sharedsched.harness import WAIT, SchedulerProcess, env_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def check(address: str, secret: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "schedserver", "--check", address],
        env=env_for(DISPYNB_SECRET=secret),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


def _square(n: int) -> int:
    return n * n


def test_a_probe_says_how_the_scheduler_is_and_is_no_user(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
) -> None:
    """Its nodes' CPUs and its user sessions; no session logged for the probe; a
    wrong secret is CRITICAL."""
    with SharedJobCluster(
        _square, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        assert cluster.submit(3)() == 9
        done = check(scheduler.address, nodes.secret)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith(
            f"OK - scheduler 'dispynb-scheduler' at {scheduler.address} serving: "
            "0 of 4 CPUs busy, 1 client, 1 computation, up "
        ), done.stdout
    wrong = check(scheduler.address, "not-the-node-secret-0123456789abcdef")
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert wrong.stdout.startswith(f"CRITICAL - scheduler at {scheduler.address}: ")
    # The fix names the check's own options, not a client's keywords nor the
    # probe's name as a user: it said "credential this server has for user
    # '<dispynb-node --check>' ... (secret=, DISPYNB_SECRET ...)".
    assert "--node_secret_file" in wrong.stdout, wrong.stdout
    assert "secret=" not in wrong.stdout and "<dispynb" not in wrong.stdout
    log = scheduler.log_text()
    assert log.count("connected from") == 1, log  # alice's only
    assert "health probe" not in log
    # The refusal in the operator's log: it said "it does not hold the credential
    # this server has for user '<dispynb-node --check>'", a user that is none.
    assert (
        "the client's proof is wrong: the health check (--check) does not use this "
        "server's node secret"
    ) in log, log
    assert "credential" not in log


def test_a_scheduler_with_no_node_up_is_a_warning(tmp_path: Path) -> None:
    secret = "node-secret-for-the-health-check-0123456789"
    with SchedulerProcess(tmp_path, [], secret, ("--register_port", "0")) as sched:
        done = check(sched.address, secret)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith(
        f"WARNING - scheduler 'dispynb-scheduler' at {sched.address} up with no "
        "node up (no CPUs): 0 of 0 CPUs busy"
    ), done.stdout


def test_a_tls_or_absent_scheduler_is_named_with_the_checks_fix(
    tmp_path: Path, nodes: LocalCluster
) -> None:
    """``--check`` of a TLS scheduler without --cluster_certfile said 'the node
    uses TLS ... give the client cafile=', and of an address where nothing listens
    'is dispynb-node running there?': a scheduler's admin was sent to a node's
    options and program."""
    from tests.ports import held_ports
    from tests.sharedsched.harness import start_tls_scheduler

    sched, _cert = start_tls_scheduler(tmp_path, nodes.node_specs(), nodes.secret)
    try:
        tls = check(sched.address, nodes.secret)
    finally:
        sched.stop()
    assert tls.returncode == 2, tls.stdout + tls.stderr
    assert tls.stdout.startswith(
        f"CRITICAL - scheduler at {sched.address}: dispynb-scheduler uses TLS "
        "(--cluster_certfile), this client does not: give the check the "
        "scheduler's --cluster_certfile"
    ), tls.stdout
    with held_ports() as port:  # nothing listens there
        nobody = check(f"127.0.0.1:{port()}", nodes.secret)
    assert nobody.returncode == 2, nobody.stdout + nobody.stderr
    assert "is dispynb-scheduler running there?" in nobody.stdout, nobody.stdout


def test_a_check_of_the_other_programs_port_says_what_answered(
    scheduler: SchedulerProcess, nodes: LocalCluster
) -> None:
    """Both programs answer the probe with the node secret, so a scheduler's check
    given a node's port said 'OK - scheduler 'vm' at ...:9711 serving', and a
    node's check of the scheduler's port 'OK - node 'dispynb-scheduler'': the
    monitoring watched the wrong program, green."""
    node = nodes.node_specs()[0]
    done = check(node, nodes.secret)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.startswith(
        f"CRITICAL - scheduler at {node}: a dispynb-node answered ("
    ), done.stdout
    assert "not a dispynb-scheduler: check the address" in done.stdout
    other = subprocess.run(
        [sys.executable, "-m", "nodeserver", "--check", scheduler.address],
        env=env_for(DISPYNB_SECRET=nodes.secret),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert other.returncode == 2, other.stdout + other.stderr
    assert other.stdout.startswith(
        f"CRITICAL - node at {scheduler.address}: a dispynb-scheduler answered "
        "('dispynb-scheduler'), not a dispynb-node: check the address (nodes listen "
        "on --port, 9711 by default; a scheduler's users connect to its -p, 9712)"
    ), other.stdout
