"""``dispynb-node --check``: an admin's monitoring asks a running node how it is,
without being one of its clients (no session logged, none of --serve's clients, no
client for --exit-without-client)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from dispynb import JobCluster
from tests import jobs
from tests.nodeproc import (
    NODE_WAIT,
    node_command,
    node_env,
    running_node,
    running_node_without_secret,
    start_node,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        node_command("--check", *args),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=NODE_WAIT,
    )


def test_a_probe_is_no_client_and_says_how_busy_the_node_is(tmp_path: Path) -> None:
    """Probes before, during and after a client's job: each says how busy the node
    is; none is logged as a client or takes one of ``--serve 2``'s clients (two
    clusters still get in, then the node stops)."""
    with running_node(tmp_path / "node", "--serve", "2", cpus=2) as node:
        secret = ("--secret-file", str(node.secret_file))
        for _ in range(3):
            idle = check(node.spec, *secret)
            assert idle.returncode == 0, idle.stdout + idle.stderr
        assert idle.stdout.startswith(
            f"OK - node 'cli-node' at {node.spec} serving: 0 of 2 CPUs busy, "
            "0 clients, 0 computations, up "
        ), idle.stdout
        assert "| busy=0;;;0;2 clients=0 computations=0 uptime=" in idle.stdout
        here = check("--port", str(node.port), *secret)  # this machine, on --port
        assert here.returncode == 0, here.stdout + here.stderr
        started = tmp_path / "started"
        with JobCluster(
            jobs.mark_and_sleep, nodes=[node.spec], secret=node.secret
        ) as cluster:
            job = cluster.submit(str(started), 60)
            jobs.wait_for_path(started)
            busy = check(node.spec, *secret)
            assert busy.returncode == 0, busy.stdout + busy.stderr
            assert "1 of 2 CPUs busy, 1 client, 1 computation," in busy.stdout
            cluster.cancel(job)
            assert job.finish.wait(NODE_WAIT)
        again = check(node.spec, *secret)
        assert again.returncode == 0, again.stdout + again.stderr
        with JobCluster(
            jobs.mark_and_sleep, nodes=[node.spec], secret=node.secret
        ) as cluster:
            assert cluster.submit(None, 0)() > 0  # the worker's pid
        # --serve 2: the two clusters were its two; it stops once they left.
        assert node.proc.wait(NODE_WAIT) == 0
    log = node.log_text()
    assert log.count("connected from") == 2, log
    assert "health probe" not in log  # debug level only


def test_an_unreachable_or_refusing_node_is_critical(tmp_path: Path) -> None:
    """A wrong secret and a port nobody listens on: exit 2, saying why (and never
    the secret)."""
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-secret\n")
    wrong.chmod(0o600)
    with running_node(tmp_path / "node") as node:
        refused = check(node.spec, "--secret-file", str(wrong))
        closed_port = node.port
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stdout.startswith(f"CRITICAL - node at {node.spec}: ")
    assert "secret" in refused.stdout and "not-the-secret" not in refused.stdout
    # The fix names the check's own options, not a client's keywords (secret=).
    assert "--secret-file" in refused.stdout and "secret=" not in refused.stdout
    gone = check(f"127.0.0.1:{closed_port}", "--secret-file", str(wrong))
    assert gone.returncode == 2, gone.stdout + gone.stderr
    assert gone.stdout.startswith(f"CRITICAL - node at 127.0.0.1:{closed_port}: ")


#: The check's own secret options, as its refusals name them.
CHECK_SECRET_OPTIONS = "--secret-file, --secret-stdin or DISPYNB_SECRET"


def test_a_refused_check_speaks_to_the_admin_running_it(tmp_path: Path) -> None:
    """A node refusing the check's secret (a wrong one, none, one for a node that
    has none) said what it says of a client ("the client's proof is wrong"); the
    line is for the admin running the check: the check's secret, its options."""
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-secret\n")
    wrong.chmod(0o600)
    with running_node(tmp_path / "node") as node:
        lines = [
            check(node.spec, "--secret-file", str(wrong)).stdout,
            check(node.spec).stdout,
        ]
    with running_node_without_secret(tmp_path / "open") as spec:
        lines.append(check(spec, "--secret-file", str(wrong)).stdout)
    assert lines == [
        f"CRITICAL - node at {node.spec}: the node refused the check's secret, which "
        "is not the one it uses; give the check the node's secret "
        f"({CHECK_SECRET_OPTIONS})\n",
        f"CRITICAL - node at {node.spec}: the node refused the check, which has no "
        f"secret; give the check the node's secret ({CHECK_SECRET_OPTIONS})\n",
        f"CRITICAL - node at {spec}: the node has no secret and refused the check's; "
        f"run the check without {CHECK_SECRET_OPTIONS}, as the node's user\n",
    ]


@pytest.mark.parametrize(
    "address", ["bad:host:x", "127.0.0.1:notaport", "127.0.0.1:70000", "[::1"]
)
def test_a_malformed_address_is_unknown_not_critical(address: str) -> None:
    """A typo in the check's own argument said CRITICAL (exit 2), paging whoever is
    on call for a node that may be fine: monitoring plugins say UNKNOWN (exit 3)
    for an argument they cannot use, naming it and the form expected."""
    done = check(address)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.startswith(f"UNKNOWN - cannot check {address}: ")
    assert "host:port" in done.stdout


def test_probes_do_not_keep_an_idle_node_alive(tmp_path: Path) -> None:
    """``--exit-without-client 2`` (a launcher's batch node) probed every half
    second still exits once no client came for 2 s: a probe is no client."""
    node = start_node(tmp_path / "node", "--exit-without-client", "2")
    try:
        deadline = time.monotonic() + NODE_WAIT
        while node.proc.poll() is None:
            assert time.monotonic() < deadline, "the probes kept the node alive"
            check(node.spec, "--secret-file", str(node.secret_file))
            time.sleep(0.5)
        assert node.proc.returncode == 0
    finally:
        node.stop()


def test_a_tls_mismatch_names_the_checks_own_options(tmp_path: Path) -> None:
    """``--check`` of a TLS node without --cafile said ``give the client cafile=``,
    a Python client's keyword, and named the address twice."""
    from tests.transport.certs import make_cert

    cert, key = make_cert(tmp_path, "node")
    with running_node(tmp_path / "node", "--certfile", cert, "--keyfile", key) as node:
        plain = check(node.spec, "--secret-file", str(node.secret_file))
        verified = check(
            node.spec, "--secret-file", str(node.secret_file), "--cafile", cert
        )
    assert plain.returncode == 2, plain.stdout + plain.stderr
    assert plain.stdout.startswith(
        f"CRITICAL - node at {node.spec}: the node uses TLS, this client does not: "
        "give --cafile (the CA that signed the node's certificate), and --certfile "
        "and --keyfile if the node checks clients' certificates"
    ), plain.stdout
    assert verified.returncode == 0, verified.stdout + verified.stderr
