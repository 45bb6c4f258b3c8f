"""Nodes that register themselves with ``dispynb-scheduler --register_port``: started
as a user starts them (``dispynb-node --register SCHEDHOST:PORT``), used like nodes
named with ``-n``; a node without the node secret is refused and logged once; a node
registering again is not counted twice; a node keeps itself known to a scheduler
that is started after it, or killed and started again."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import pytest

from dispynb.errors import ConfigurationError
from dispynb.protocol.discovery import new_boot_id
from nodeserver.parser import parse_args
from nodeserver.register import register
from schedserver.config import SchedulerConfig
from tests.nodeproc import NODE_WAIT, CliNode, running_node, start_node
from tests.ports import PortHolder
from tests.sharedsched.harness import (
    TIMED_CLIENT,
    WAIT,
    SchedulerProcess,
    run_client,
)

SECRET = "the-node-secret"


def registering_scheduler(tmp_path: Path, *args: str) -> tuple[SchedulerProcess, str]:
    """A scheduler with no ``-n`` and a registration listener on a free port (and
    ``args``); return it and the address nodes register with (read from its log)."""
    sched = SchedulerProcess(tmp_path, [], SECRET, args=("--register_port", "0", *args))
    sched.start()
    sched.wait_for_log("listening for node registrations on")
    found = re.search(r"node registrations on 127\.0\.0\.1:(\d+)", sched.log_text())
    assert found, sched.log_text()
    return sched, f"127.0.0.1:{found.group(1)}"


def runs_jobs(
    sched: SchedulerProcess,
    credential: Path,
    jobs: int,
    cwd: Path,
    seconds: float = 0.0,
) -> None:
    """A client of ``credential`` (a separate process) runs ``jobs`` jobs of
    ``seconds`` each through ``sched`` and gets every result, in order."""
    out = run_client(
        TIMED_CLIENT, sched.address, str(credential), str(jobs), str(seconds), cwd=cwd
    )
    assert out["results"] == list(range(jobs))


def test_a_registered_node_runs_the_users_jobs(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    sched, address = registering_scheduler(tmp_path)
    try:
        with running_node(
            tmp_path / "node", "--register", address, secret=SECRET, cpus=2
        ) as node:
            sched.wait_for_log(
                f"node {node.spec} is up with 2 CPUs (its name: cli-node)"
            )
            runs_jobs(sched, users["alice"], 6, tmp_path, 0.1)
            assert "registered with the client at" in node.log_text()
    finally:
        sched.stop()


def test_a_node_without_the_secret_is_refused_and_logged_once(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    sched, address = registering_scheduler(tmp_path)
    try:
        for n in range(2):
            wrong = start_node(
                tmp_path / f"wrong{n}", "--register", address, secret="not-it"
            )
            try:
                # It stops, saying why, and fails: exit 2, a setting that cannot
                # work (it exited 0, a success to systemd, which did not list it
                # as failed).
                assert wrong.proc.wait(NODE_WAIT) == 2
            finally:
                wrong.stop()
            assert "rejected this node's registration" in wrong.log_text()
        log = sched.log_text()
        assert log.count("registration from 127.0.0.1 refused: wrong proof") == 1
        with running_node(tmp_path / "good", "--register", address, secret=SECRET):
            sched.wait_for_log("is up with")
            runs_jobs(sched, users["bob"], 3, tmp_path)
        assert sched.log_text().count("is up with") == 1  # never the wrong ones
    finally:
        sched.stop()


def test_a_scheduler_host_node_without_the_secret_names_the_scheduler_and_the_fix(
    tmp_path: Path,
) -> None:
    """``--scheduler_host`` with another secret than the scheduler's node secret:
    the node stops (exit 2) saying the scheduler rejected it and which secret it
    needs. It said 'the client at ... rejected this node's registration: the
    node's secret is not the client's', naming neither the scheduler nor a fix."""
    sched, address = registering_scheduler(tmp_path)
    try:
        wrong = start_node(
            tmp_path / "wrong", "--scheduler_host", address, secret="not-it" * 8
        )
        try:
            assert wrong.proc.wait(NODE_WAIT) == 2
        finally:
            wrong.stop()
        log = wrong.log_text()
        assert (
            f"the scheduler at {address} rejected this node's registration: the "
            "node's secret is not the scheduler's; give the node the scheduler's "
            "node secret (the file of its --node_secret_file" in log
        ), log
        # ... and the scheduler names its own option (it said "this cluster's
        # secret", a launcher's words)
        assert (
            "registration from 127.0.0.1 refused: wrong proof: the node does not "
            "have this scheduler's node secret (--node_secret_file"
        ) in sched.log_text()
    finally:
        sched.stop()


def test_a_node_registering_again_is_counted_once(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    sched, address = registering_scheduler(tmp_path)
    try:
        with running_node(
            tmp_path / "node", "--register", address, secret=SECRET
        ) as node:
            sched.wait_for_log(f"node {node.spec} is up with")

            async def again(boot: bytes) -> None:
                await register(
                    address,
                    secret=SECRET.encode(),
                    name="cli-node",
                    port=node.port,
                    cpus=1,
                    boot=boot,
                    patience=NODE_WAIT,
                )

            boot = new_boot_id()
            asyncio.run(again(boot))  # as if it restarted: a new boot id
            asyncio.run(again(boot))  # its liveness check: the same boot id
            log = sched.log_text()
            assert log.count(f"registered at {node.spec}") == 2  # once per boot
            runs_jobs(sched, users["alice"], 2, tmp_path)
            assert sched.log_text().count("is up with") == 1
    finally:
        sched.stop()


def test_dispynodes_scheduler_host_registers_on_the_default_port() -> None:
    assert parse_args(["--scheduler_host", "10.1.2.3"]).register == "10.1.2.3:9714"
    assert parse_args(["--scheduler_node", "sched:9800"]).register == "sched:9800"


def test_dispynodes_older_scheduler_port_is_the_port_of_its_scheduler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """dispynode up to 4.10: ``--scheduler_node HOST --scheduler_port PORT`` (before:
    "unrecognized arguments: --scheduler_port")."""
    args = ["--scheduler_node", "sched", "--scheduler_port", "9800"]
    assert parse_args(args).register == "sched:9800"
    assert parse_args(["--scheduler_port", "9800", "--scheduler_host", "sched:9800"])
    for wrong, says in (
        (["--scheduler_port", "9800"], "--scheduler_port needs --scheduler_host"),
        (["--scheduler_host", "sched:9801", "--scheduler_port", "9800"], "9801"),
    ):
        with pytest.raises(SystemExit) as exited:
            parse_args(wrong)
        assert exited.value.code == 2
        assert says in capsys.readouterr().err


def wait_for_node_log(node: CliNode, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + WAIT
    while node.log_text().count(text) < count:
        assert node.proc.poll() is None, node.log_text()
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged:\n{node.log_text()}")
        time.sleep(0.02)


def test_a_node_waits_for_a_scheduler_started_after_it(
    tmp_path: Path, users: dict[str, Path], held_port: PortHolder
) -> None:
    port = held_port()  # the scheduler's, once it starts
    with running_node(
        tmp_path / "node", "--scheduler_host", f"127.0.0.1:{port}", "-d",
        "--ping_interval", "0.5", secret=SECRET, cpus=2,
    ) as node:  # fmt: skip
        # Past its first attempts (debug lines), said once: it waits, quietly.
        wait_for_node_log(node, "registration with 127.0.0.1", count=3)
        assert node.log_text().count("trying until it answers") == 1
        # in words, naming the scheduler and what to check (asyncio's were
        # "[Errno 111] Connect call failed ('127.0.0.1', PORT)")
        assert (
            f"cannot register with the scheduler at 127.0.0.1:{port} yet (connection "
            f"refused: nothing listens on port {port} there; is dispynb-scheduler "
            "running there, with --register_port?): trying until it answers"
        ) in node.log_text(), node.log_text()
        with SchedulerProcess(
            tmp_path, [], SECRET, args=("--register_port", str(port))
        ) as sched:
            sched.wait_for_log(f"node {node.spec} is up with 2 CPUs")
            runs_jobs(sched, users["alice"], 4, tmp_path)


def test_a_registered_node_finds_its_restarted_scheduler(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    """The scheduler is SIGKILLed and started again on the same ports: the node,
    not restarted, registers again, says so once (not once per attempt), and runs
    a new client's jobs."""
    sched, address = registering_scheduler(tmp_path)
    with running_node(
        tmp_path / "node", "--scheduler_host", address, "-d",
        "--ping_interval", "0.5", secret=SECRET, cpus=2,
    ) as node:  # fmt: skip
        try:
            sched.wait_for_log(f"node {node.spec} is up with 2 CPUs")
            runs_jobs(sched, users["alice"], 3, tmp_path)
        finally:
            sched.stop(signal.SIGKILL)
        wait_for_node_log(node, "lost the scheduler at")
        wait_for_node_log(node, "registering again with", count=3)  # debug level
        since = len(sched.log_text())
        with SchedulerProcess(
            tmp_path, [], SECRET, port=sched.port,
            args=("--register_port", address.rpartition(":")[2]),
        ) as again:  # fmt: skip
            again.wait_for_log(f"node {node.spec} is up with 2 CPUs", since=since)
            runs_jobs(again, users["bob"], 4, tmp_path)
            log = node.log_text()  # before this scheduler goes too
        assert node.proc.poll() is None  # never restarted
        # --scheduler_host: its log names the scheduler (it said "the client",
        # which in a node's log are the users' programs)
        assert log.count("lost the scheduler at") == 1
        assert log.count("registered again with the scheduler at") == 1
        assert log.count("registered with the scheduler at") == 1  # at start
        assert "the client" not in log


def test_a_killed_registered_node_is_forgotten_and_its_restart_elsewhere_taken(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    """A registered node killed and started again on another port (a batch job
    requeued elsewhere): the old address is forgotten after ``--forget_registered``
    s, not tried for ever; the new one runs a client's jobs."""
    sched, address = registering_scheduler(tmp_path, "--forget_registered", "2")
    args = ("--scheduler_host", address, "--ping_interval", "0.5")
    try:
        with running_node(tmp_path / "old", *args, secret=SECRET, cpus=2) as old:
            sched.wait_for_log(f"node {old.spec} is up with 2 CPUs")
            old.stop(signal.SIGKILL)
        with running_node(tmp_path / "new", *args, secret=SECRET, cpus=2) as new:
            sched.wait_for_log(f"node {new.spec} is up with 2 CPUs")
            sched.wait_for_log(f"node {old.spec} forgotten: unreachable for")
            runs_jobs(sched, users["alice"], 4, tmp_path)
        assert sched.log_text().count(f"node {old.spec} forgotten") == 1
    finally:
        sched.stop()


def test_a_forgotten_node_registering_again_from_the_same_boot_is_taken_again(
    tmp_path: Path, held_port: PortHolder
) -> None:
    """Forgetting a node also forgets its boot: a node unreachable for a while (cut
    off, stopped) that registers again, not restarted, is taken again."""
    sched, address = registering_scheduler(tmp_path, "--forget_registered", "1")
    try:
        port = held_port()  # nobody listens there: the node is unreachable
        boot = new_boot_id()

        async def registers() -> None:
            await register(
                address, secret=SECRET.encode(), name="cut-off", port=port,
                cpus=1, boot=boot, patience=NODE_WAIT,
            )  # fmt: skip

        asyncio.run(registers())
        sched.wait_for_log(f"node 127.0.0.1:{port} forgotten")
        asyncio.run(registers())  # the same boot id
        sched.wait_for_log(f"node 127.0.0.1:{port} forgotten", count=2)
        assert sched.log_text().count(f"registered at 127.0.0.1:{port}") == 2
    finally:
        sched.stop()


def test_forget_registered_out_of_range_is_refused_in_one_line() -> None:
    config = SchedulerConfig(
        register_port=0, node_secret=b"s", users_file="users", forget_registered=0.5
    )
    with pytest.raises(ConfigurationError, match="--forget_registered must be within"):
        config.validate()


def test_a_scheduler_host_node_without_its_scheduler_says_the_scheduler_is_gone(
    tmp_path: Path,
) -> None:
    """``--scheduler_host`` with ``--exit-without-client``: the scheduler killed,
    the node stops, saying 'the scheduler it registered with is gone' (it said
    'the client', which in a node's log are the users' programs)."""
    sched, address = registering_scheduler(tmp_path)
    node = start_node(
        tmp_path / "node", "--scheduler_host", address,
        "--exit-without-client", "1", secret=SECRET,
    )  # fmt: skip
    try:
        sched.wait_for_log(f"node {node.spec} is up with")
        sched.stop(signal.SIGKILL)
        assert node.proc.wait(60) == 0, node.log_text()
    finally:
        node.stop()
    log = node.log_text()
    assert (
        "no client connected for 1 s (--exit-without-client) and the scheduler it "
        "registered with is gone: stopping"
    ) in log, log
    assert "the scheduler this node registered with is gone" in log
    assert "the client" not in log
