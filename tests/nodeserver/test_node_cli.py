"""End-to-end tests of the node command, ``python -m nodeserver``, as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from dispynb.secret import MIN_SECRET_BITS, estimate_bits
from tests import jobs
from tests.daemonhooks import (
    run_in_own_group,
    signalled_as_loop_closes,
    stopped_as_loop_starts,
)
from tests.jobs import WAIT, wait_for_path, wait_until
from tests.nodeproc import (
    NODE_WAIT,
    node_command,
    node_env,
    running_node,
    start_node,
    write_secret_file,
)

pytestmark = pytest.mark.slow


def run_node(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a node that must exit by itself (a timeout fails the test)."""
    return subprocess.run(
        node_command(*args),
        env=node_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=NODE_WAIT,
    )


def test_node_cli_public_host_without_secret_or_tls_exits_2_with_fix(tmp_path):
    port_file = tmp_path / "port"
    done = run_node("--host", "0.0.0.0", "--port", "0", "--port-file", str(port_file))
    assert done.returncode == 2
    assert "refusing to listen on '0.0.0.0'" in done.stderr
    assert "--secret-file" in done.stderr  # how to fix it
    assert "made with 'dispynb secret FILE'" in done.stderr  # ... and make one
    assert "--certfile" in done.stderr
    assert "127.0.0.1" in done.stderr
    assert not port_file.exists()  # it never listened


def test_node_cli_log_says_one_cpu_not_one_cpus(tmp_path):
    """A one-CPU node (a SLURM task's, a LocalCluster's) logged "serving 1 CPUs"."""
    with running_node(tmp_path / "node", cpus=1) as node:
        # Its port file is written just before the line: wait for the line.
        wait_until(lambda: "serving 1 C" in node.log_text())
        assert f"serving 1 CPU on 127.0.0.1:{node.port}" in node.log_text()


def test_node_cli_exit_without_client_says_why_in_its_last_line(tmp_path):
    """A batch node that ended by --exit-without-client (its client died) ended its
    log with a bare 'stopped', which the guide says marks a node that stopped
    cleanly, and why."""
    done = run_node(
        "--host", "127.0.0.1", "--port", "0", "--exit-without-client", "0.2",
        "--dest-path", str(tmp_path / "dest"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.endswith("stopped (no client for 0.2 s, --exit-without-client)"), (
        done.stderr
    )


def test_node_cli_port_in_use_exits_1_naming_the_address_and_the_fix(tmp_path):
    """A second node on the port of a running one (the first-hour mistake of
    starting a node twice) says which address is taken and what to do."""
    with running_node(tmp_path / "first") as first:
        done = run_node(
            "--host", "127.0.0.1", "--port", str(first.port),
            "--dest-path", str(tmp_path / "d"),
        )  # fmt: skip
    assert done.returncode == 1
    assert f"127.0.0.1:{first.port} is already in use" in done.stderr, done.stderr
    assert "stop it, or give another --port" in done.stderr  # how to fix it
    assert "[Errno" not in done.stderr  # the line says it in words


def test_node_cli_without_secret_serves_although_its_discovery_port_is_taken(
    tmp_path,
):
    """A node without a secret answers discovery on 127.0.0.1 by default; a port
    held by another program turns that off (with a warning), not the node."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))  # no SO_REUSEADDR: the node cannot share it
    taken = holder.getsockname()[1]
    port_file = tmp_path / "port"
    log = tmp_path / "node.log"
    with holder, open(log, "wb") as handle:
        args = ["--port", "0", "--port-file", str(port_file)]
        args += ["--discovery-port", str(taken), "--dest-path", str(tmp_path / "d")]
        proc = subprocess.Popen(
            node_command(*args),
            env=node_env(),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: port_file.exists() or proc.poll() is not None)
            assert proc.poll() is None, log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(NODE_WAIT) == 0
    text = log.read_text()
    assert f"discovery off: cannot answer pings on UDP 127.0.0.1:{taken}" in text
    assert "WITHOUT a secret (loopback only)" in text


def test_node_cli_secret_file_readable_by_others_refused_with_chmod_hint(tmp_path):
    secret_file = write_secret_file(tmp_path / "secret", "loose-secret", mode=0o644)
    port_file = tmp_path / "port"
    done = run_node(
        "--port", "0", "--port-file", str(port_file), "--secret-file", str(secret_file)
    )  # fmt: skip
    assert done.returncode == 2
    assert f"chmod 600 {secret_file}" in done.stderr
    assert "loose-secret" not in done.stderr + done.stdout
    assert not port_file.exists()


def test_node_cli_missing_secret_file_refused(tmp_path):
    done = run_node(
        "--port", "0", "--port-file", str(tmp_path / "port"),
        "--secret-file", str(tmp_path / "no-such-file"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "does not exist" in done.stderr


@pytest.mark.parametrize("words", [["-s", "-Zx"], ["--secret", "-Zx"]])
def test_node_cli_secret_beginning_with_a_dash_is_refused_saying_how_to_give_it(
    words,
):
    """argparse takes ``-s -Zx`` for two options: the node said only "argument
    -s/--secret: expected one argument", nothing of the '-' or of the way out."""
    done = run_node(*words, "--port", "0")
    assert done.returncode == 2
    assert done.stderr.endswith(
        "dispynb-node: error: argument -s/--secret: expected one argument (a value "
        "beginning with '-' goes after '=': --secret=VALUE)\n"
    ), done.stderr


@pytest.mark.parametrize("option", ["--secret", "-s"])
def test_node_cli_secret_beginning_with_a_dash_after_an_equals_sign_is_the_secret(
    tmp_path, option
):
    """What the refusal above says works: the node takes ``--secret=-...`` (and
    ``-s=-...``) over its secret file, and a client with that secret runs jobs."""
    secret = "-begins-with-a-dash-0123456789abcdef"
    with running_node(tmp_path / "node", f"{option}={secret}") as node:
        assert node.secret != secret  # the file's, which the option overrides
        with JobCluster(jobs.square, nodes=[node.spec], secret=secret) as cluster:
            assert cluster.submit(4)() == 16


@pytest.mark.parametrize(
    ("signum", "drain"),
    [(signal.SIGTERM, "0"), (signal.SIGINT, "0"), (signal.SIGINT, "60")],
    ids=["TERM-no-drain", "INT-no-drain", "INT-twice-while-draining"],
)
def test_node_cli_signal_with_job_running_stops_cleanly(tmp_path, signum, drain):
    node = start_node(tmp_path / "node", "--drain-timeout", drain, cpus=2)
    marker = tmp_path / "started"
    cluster = JobCluster(jobs.mark_and_sleep, nodes=[node.spec], secret=node.secret)
    try:
        job = cluster.submit(str(marker), 60)
        wait_for_path(marker)
        server = psutil.Process(node.proc.pid)
        # The computation process and its 2 workers (the second is forked once the
        # computation process has left the first one's cgroup: it may come later).
        wait_until(lambda: len(jobs.computation_processes(server)) >= 3)
        children = server.children(recursive=True)
        assert jobs.read_pid(marker) in {child.pid for child in children}

        if drain != "0":  # the first signal drains; the second one ends the job
            node.proc.send_signal(signum)
            wait_until(lambda: "draining" in node.log_text())
            assert node.proc.poll() is None
        assert node.stop(signum) == 0
        _gone, alive = psutil.wait_procs(children, timeout=WAIT)
        assert alive == []

        # The client learns that the node is gone; the job cannot finish.
        assert job.wait(timeout=WAIT)
        assert job.status == DispyJob.Abandoned
    finally:
        cluster.close(terminate=True)
    assert "Traceback" not in node.log_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_node_cli_signal_when_idle_exits_zero_and_logs_shutdown(tmp_path, signum):
    """The log names the signal (it said 'shutting down' only; the scheduler's
    said 'stopping (SIGTERM)'): the admin reads who stopped the node."""
    node = start_node(tmp_path / "node")
    assert node.stop(signum) == 0
    assert f"shutting down ({signal.Signals(signum).name})" in node.log_text()


def test_node_cli_new_secret_writes_a_strong_0600_file_and_serves_with_it(tmp_path):
    secret_file, port_file = tmp_path / "secret", tmp_path / "port"
    command = node_command(
        "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
        "--new-secret", str(secret_file), "--dest-path", str(tmp_path / "dest"),
    )  # fmt: skip
    with subprocess.Popen(
        command, env=node_env(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as proc:
        try:
            wait_for_path(port_file)
            assert os.stat(secret_file).st_mode & 0o777 == 0o600
            secret = secret_file.read_text().strip()
            assert estimate_bits(secret.encode()) >= MIN_SECRET_BITS
            spec = f"127.0.0.1:{int(port_file.read_text())}"
            with JobCluster(
                jobs.square, nodes=[spec], secret_file=str(secret_file)
            ) as jc:
                assert jc.submit(4)() == 16
        finally:
            proc.terminate()
            _out, err = proc.communicate(timeout=NODE_WAIT)
    assert secret not in err.decode()
    again = run_node("--port", "0", "--new-secret", str(secret_file))
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize("when", ["serving", "before-start"])
def test_node_cli_parent_pipe_eof_stops_the_node(tmp_path, when):
    """``--parent-pipe FD`` (LocalCluster): the node stops when every holder of the
    pipe's write end has exited, even if that happened before it started watching
    (a parent killed while the node was still importing)."""
    from dispynb.secret import random_secret

    read_end, write_end = os.pipe()
    port_file = tmp_path / "port"
    command = node_command(
        "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
        "--cpus", "1", "--dest-path", str(tmp_path / "dest"),
        "--parent-pipe", str(read_end), "--loglevel", "warning",
    )  # fmt: skip
    proc = subprocess.Popen(
        command,
        env={**node_env(), "DISPYNB_SECRET": random_secret()},
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(read_end,),
        start_new_session=True,
    )
    os.close(read_end)
    try:
        if when == "serving":
            wait_for_path(port_file)
            assert proc.poll() is None
        os.close(write_end)  # the parent "exits"
        _, err = proc.communicate(timeout=NODE_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "the process that started this node exited; stopping" in err


def test_node_log_says_a_browser_speaks_another_protocol(tmp_path):
    """A browser (or curl) pointed at a node's port: the node's log says the peer
    spoke HTTP, not only that its first bytes announced a message of a gigabyte."""
    with running_node(tmp_path / "node") as node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=WAIT) as peer:
            peer.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            peer.settimeout(WAIT)
            while peer.recv(65536):  # an error message, perhaps; then closed
                pass
        said = "it sent HTTP (GET), and this port speaks dispynb's protocol"
        wait_until(lambda: said in node.log_text())
    assert re.search(
        r"rejected connections from 127\.0\.0\.1:\d+: peer announced a", node.log_text()
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
@pytest.mark.parametrize("program", ["-m nodeserver", "dispynb-node"])
def test_node_cli_stop_signal_while_starting_exits_zero_and_says_so(
    tmp_path, signum, program
):
    """A stop signal before the node's event loop ran (systemd stopping a unit it
    just started; here the node waits for its --secret-stdin) took the signal's
    default action: the node died of SIGTERM or SIGHUP saying nothing, of SIGINT
    with a KeyboardInterrupt traceback, its zygote left to die by itself."""
    proc = _starting_node(
        tmp_path,
        # The console script's entry point, as installed.
        "import sys, nodeserver.__main__ as m; sys.exit(m.main())"
        if program == "dispynb-node"
        else None,
    )
    try:
        node = psutil.Process(proc.pid)
        # Its zygote is forked before it reads the secret: it is well into start-up.
        wait_until(lambda: node.children(), timeout=NODE_WAIT)
        zygote = node.children()[0]
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=NODE_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"dispynb-node: stopped by {signal.Signals(signum).name} while starting" in (
        err
    )
    assert "Traceback" not in err
    zygote.wait(timeout=NODE_WAIT)  # reaped by the node, or gone with it


def test_node_cli_stop_signal_during_at_fork_callbacks_is_not_lost(tmp_path):
    """A SIGTERM that came while the node forked its zygote was handled inside an
    at-fork callback (logging's, here one of the test's own, to hit that moment
    every time): Python printed "Exception ignored" and dropped the `StopSignal`,
    and the node went on to wait for its --secret-stdin, then exited 2."""
    proc = _starting_node(
        tmp_path,
        "import os, signal, sys\n"
        "def stop():\n"
        "    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.register_at_fork(after_in_parent=stop)\n"
        "import nodeserver.__main__ as m\n"
        "sys.exit(m.main())",
    )
    try:
        # No secret on stdin: a node that lost the signal reads none, and exits 2.
        _out, err = proc.communicate(timeout=NODE_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "dispynb-node: stopped by SIGTERM while starting" in err
    assert "Exception ignored" not in err
    assert "Traceback" not in err


def test_node_cli_group_sigterm_as_its_event_loop_starts_stops_it(tmp_path):
    """A SIGTERM to the node's process group (a batch system ending the job,
    systemd stopping the unit's cgroup) between start-up's last checkpoint and the
    event loop's handlers, handled where Python drops the `StopSignal` (here a
    ``__del__``): the node served on, deaf to it, until it was SIGKILLed."""
    secret = write_secret_file(tmp_path / "secret", "cli-node-secret")
    command = node_command(
        "--host", "127.0.0.1", "--port", "0", "--secret-file", str(secret),
        "--dest-path", str(tmp_path / "dest"), "--loglevel", "info",
    )  # fmt: skip
    command[1:3] = ["-c", stopped_as_loop_starts("nodeserver")]
    done = run_in_own_group(command, node_env(), NODE_WAIT)
    err = done.stderr
    assert done.returncode == 0, err
    assert "shutting down (SIGTERM)" in err
    assert "stopped (SIGTERM)" in err
    assert "Traceback" not in err
    assert " ERROR " not in err


def test_node_cli_signal_as_its_event_loop_closes_is_no_death_by_signal(tmp_path):
    """Closing the event loop gave the stop signals their default actions back: a
    SIGTERM then (systemd's, or a second one) killed the stopping node, which
    exited by the signal, not with status 0."""
    command = node_command(
        "--host", "127.0.0.1", "--port", "0", "--exit-without-client", "0.2",
        "--dest-path", str(tmp_path / "dest"), "--loglevel", "info",
    )  # fmt: skip
    command[1:3] = ["-c", signalled_as_loop_closes("nodeserver")]
    done = run_in_own_group(command, node_env(), NODE_WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stderr.rstrip().endswith("--exit-without-client)"), done.stderr


def _starting_node(tmp_path, program: str | None = None) -> subprocess.Popen[str]:
    """A node waiting for its --secret-stdin; ``python -c program`` if given."""
    command = node_command(
        "--secret-stdin", "--port", "0", "--dest-path", str(tmp_path / "dest")
    )
    if program is not None:
        command[1:3] = ["-c", program]
    return subprocess.Popen(
        command,
        env=node_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
