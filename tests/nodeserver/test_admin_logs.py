"""What a node's administrator reads in its log: its limits' refusals, named, and
its lines' priorities under systemd."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess

import pytest

from dispynb import JobCluster
from dispynb.errors import SetupError
from dispynb.transport.addressing import bind_listening
from tests import jobs
from tests.nodeproc import NODE_WAIT, node_command, node_env, running_node, start_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def nothing() -> int:
    return 0


def test_a_computation_refused_by_a_node_limit_is_logged_at_the_node(
    tmp_path, monkeypatch
):
    """A computation whose files pass --max-file-size or --transfer-quota was
    refused to its client only: the node's log said nothing, so its admin could
    not tell why users' clusters failed there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    (tmp_path / "mid.bin").write_bytes(b"y" * 3000)
    with running_node(
        tmp_path / "node", "--max-file-size", "4000", "--transfer-quota", "2000"
    ) as node:
        with pytest.raises(SetupError, match="maximum file size"):
            JobCluster(
                nothing, nodes=[node.spec], secret=node.secret, depends=["big.bin"]
            )
        with pytest.raises(SetupError, match="transfer quota"):
            JobCluster(
                nothing, nodes=[node.spec], secret=node.secret, depends=["mid.bin"]
            )
    refused = [
        line for line in node.log_text().splitlines() if "refused computation" in line
    ]
    assert len(refused) == 2, node.log_text()
    assert "WARNING" in refused[0]
    assert "'nothing'" in refused[0] and "--max-file-size" in refused[0]
    assert "'big.bin'" in refused[0] and "127.0.0.1" in refused[0]
    assert "--transfer-quota" in refused[1]


def test_under_systemd_each_line_carries_its_priority_for_the_journal(tmp_path):
    """A node run by systemd (stderr the journal, JOURNAL_STREAM naming it) wrote
    every line at the journal's default priority, info: ``journalctl -p warning``
    showed none of its warnings or errors, and each line had a second timestamp.
    Lines now begin with their syslog priority (``<4>`` for a warning, sd-daemon(3))
    and leave the time to the journal; with stderr elsewhere they are as before."""
    log = tmp_path / "stderr"
    with open(log, "wb") as handle:
        info = os.fstat(handle.fileno())
        env = {**node_env(), "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        done = subprocess.run(
            node_command("--serve", "0", "--dest-path", str(tmp_path / "dest")),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=handle,
            timeout=NODE_WAIT,
        )
    assert done.returncode == 0
    lines = log.read_text().splitlines()
    assert any(line.startswith("<4>nodeserver WARNING no secret") for line in lines)
    assert "<6>nodeserver INFO --serve 0: nothing to serve" in lines, lines
    plain = subprocess.run(  # stderr not the journal: the variable is no match
        node_command("--serve", "0", "--dest-path", str(tmp_path / "dest")),
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_WAIT,
    )
    assert plain.returncode == 0
    assert not any(line.startswith("<") for line in plain.stderr.splitlines())
    assert " nodeserver INFO --serve 0: nothing to serve" in plain.stderr
    with open(log, "wb") as handle:  # the one line of a node that cannot start
        info = os.fstat(handle.fileno())
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        failed = subprocess.run(
            node_command("--secret-file", str(tmp_path / "missing"), "--serve", "0"),
            env=env,
            stdout=handle,
            stderr=handle,
            timeout=NODE_WAIT,
        )
    assert failed.returncode == 2
    assert log.read_text().startswith("<3>dispynb-node: secret file "), log.read_text()
    # ... and a refused option, or a bad --config file: argparse's lines came at
    # the default priority (info), which 'journalctl -p err' leaves out
    config = tmp_path / "node.ini"
    config.write_text("[DEFAULT]\ncpus = x\n")
    with open(log, "wb") as handle:
        info = os.fstat(handle.fileno())
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        for args in (["--config", str(config)], ["--init", "x"], ["--cpus", "x"]):
            refused = subprocess.run(
                node_command(*args), env=env, stdout=handle, stderr=handle,
                timeout=NODE_WAIT,
            )  # fmt: skip
            assert refused.returncode == 2
    said = log.read_text().splitlines()
    assert (
        f"<3>dispynb-node: config file {str(config)!r}, line 2: argument -c/--cpus: "
        in (said[0])
    ), said
    assert said[1].startswith("<3>dispynb-node: --init is not supported"), said
    assert said[-1].startswith("<3>dispynb-node: error: argument -c/--cpus"), said


def test_an_address_the_machine_lacks_is_named_with_the_fix(tmp_path, secret_file):
    """``-i`` an address no interface has (a typo, or the network not up yet at
    boot) stopped the node with the OS's words alone: 'cannot start: [Errno 99]
    Cannot assign requested address', naming neither the address nor a fix."""
    done = subprocess.run(
        node_command(
            "-i", "192.0.2.1",  # TEST-NET-1: on no interface here; bind sends nothing
            "--secret-file", str(secret_file),
            "--no-discovery",
            "--dest-path", str(tmp_path / "dest"),
        ),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=NODE_WAIT,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot listen on 192.0.2.1:9711: no interface of this machine" in (
        done.stderr
    ), done.stderr
    assert "network-online.target" in done.stderr


def test_a_host_name_that_does_not_resolve_is_named(monkeypatch):
    """The same for a name the resolver does not know (looked up here without the
    network: the resolver's answer is given)."""

    def unknown(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(OSError, match=r"cannot listen on 'node7\.lab': the name does"):
        bind_listening("node7.lab", 0)


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text("a-secret-long-enough-for-a-network-address-0123456789\n")
    path.chmod(0o600)
    return path


def _stop_the_whole_unit_with_jobs_running(tmp_path) -> str:
    """Run two 60 s jobs on a node draining 30 s, then SIGTERM the node and every
    process under it, as systemd (KillMode=control-group) or slurmstepd does;
    return the node's log."""
    import psutil

    node = start_node(tmp_path / "node", "--drain-timeout", "30", cpus=2)
    try:
        with JobCluster(
            jobs.mark_and_sleep, nodes=[node.spec], secret=node.secret
        ) as cluster:
            running = [
                cluster.submit(str(tmp_path / f"started{i}"), 60) for i in range(2)
            ]
            for i in range(2):
                jobs.wait_for_path(tmp_path / f"started{i}")
            unit = psutil.Process(node.proc.pid)
            for process in [unit, *unit.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGTERM)
            assert node.proc.wait(NODE_WAIT) == 0
            for job in running:
                assert job.finish.wait(NODE_WAIT), job.status
    finally:
        node.stop()
    return node.log_text()


def test_jobs_killed_with_a_systemd_unit_say_how_to_let_them_drain(
    tmp_path, monkeypatch
):
    """``systemctl stop`` of a unit without KillMode=mixed signals every process
    of it: the running jobs die with the node instead of draining, and the log
    said only that they were left to their clients. A node run by systemd
    (INVOCATION_ID) now says once how to fix the unit."""
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    log = _stop_the_whole_unit_with_jobs_running(tmp_path)
    assert log.count("set KillMode=mixed") == 1, log


def test_jobs_killed_by_the_stop_signal_are_not_logged_as_drained(tmp_path):
    """SLURM's scancel (or walltime) signals a job step whole: the running jobs
    died of the node's own SIGTERM, yet the node then logged "drained: every
    running job ended", as if they had finished. It now says they were killed."""
    log = _stop_the_whole_unit_with_jobs_running(tmp_path)
    assert "drained: every running job ended" not in log, log
    assert "draining" in log
    assert "2 running jobs were killed by the stop signal, not drained" in log, log
    assert "set KillMode=mixed" not in log  # not a systemd unit


def test_a_dest_path_that_cannot_be_made_is_named_as_a_setting(tmp_path):
    """``--dest-path`` where no directory can be made (under a file, here; a
    read-only or another user's place alike) stopped the node with the OS's words
    alone and exit 1, which a service restarts for ever: 'cannot start: [Errno 20]
    Not a directory: ...'. It names the option, and exits 2."""
    (tmp_path / "file").write_text("")
    dest = tmp_path / "file" / "dest"
    done = subprocess.run(
        node_command("--dest-path", str(dest), "--port", "0"),
        env=node_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=NODE_WAIT,
    )
    assert done.returncode == 2, done.stderr
    assert f"dispynb-node: --dest-path {dest}: cannot make this directory (Not a " in (
        done.stderr
    ), done.stderr


def test_a_stopped_node_says_so_last(tmp_path):
    """Its log ended with "shutting down (SIGTERM)" (then the clients' goodbyes):
    whether it then stopped, or was killed or hung while draining, the log did
    not say."""
    node = start_node(tmp_path)
    assert node.stop() == 0
    lines = node.log_text().strip().splitlines()
    assert lines[-1].endswith("nodeserver INFO stopped (SIGTERM)"), lines
