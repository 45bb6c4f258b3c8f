"""Nodes that register themselves with ``dispynb-scheduler --register_port``: started
as a user starts them (``dispynb-node --register SCHEDHOST:PORT``), used like nodes
named with ``-n``; a node without the node secret is refused and logged once; a node
registering again is not counted twice."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from dispynb.protocol.discovery import new_boot_id
from nodeserver.parser import parse_args
from nodeserver.register import register
from tests.nodeproc import NODE_WAIT, running_node, start_node
from tests.sharedsched.harness import TIMED_CLIENT, SchedulerProcess, run_client

SECRET = "the-node-secret"


def registering_scheduler(tmp_path: Path) -> tuple[SchedulerProcess, str]:
    """A scheduler with no ``-n`` and a registration listener on a free port; return
    it and the address nodes register with (read from its log)."""
    sched = SchedulerProcess(tmp_path, [], SECRET, args=("--register_port", "0"))
    sched.start()
    sched.wait_for_log("listening for node registrations on")
    found = re.search(r"node registrations on 127\.0\.0\.1:(\d+)", sched.log_text())
    assert found, sched.log_text()
    return sched, f"127.0.0.1:{found.group(1)}"


def test_a_registered_node_runs_the_users_jobs(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    sched, address = registering_scheduler(tmp_path)
    try:
        with running_node(
            tmp_path / "node", "--register", address, secret=SECRET, cpus=2
        ) as node:
            sched.wait_for_log(f"node {node.spec} is up with 2 CPUs")
            out = run_client(
                TIMED_CLIENT, sched.address, str(users["alice"]), "6", "0.1",
                cwd=tmp_path,
            )  # fmt: skip
            assert out["results"] == list(range(6))
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
                assert wrong.proc.wait(NODE_WAIT) == 0  # it stops, saying why
            finally:
                wrong.stop()
            assert "rejected this node's registration" in wrong.log_text()
        log = sched.log_text()
        assert log.count("registration from 127.0.0.1 refused: wrong proof") == 1
        with running_node(tmp_path / "good", "--register", address, secret=SECRET):
            sched.wait_for_log("is up with")
            out = run_client(
                TIMED_CLIENT, sched.address, str(users["bob"]), "3", "0.0",
                cwd=tmp_path,
            )  # fmt: skip
            assert out["results"] == [0, 1, 2]
        assert sched.log_text().count("is up with") == 1  # never the wrong ones
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
            out = run_client(
                TIMED_CLIENT, sched.address, str(users["alice"]), "2", "0.0",
                cwd=tmp_path,
            )  # fmt: skip
            assert out["results"] == [0, 1]
            assert sched.log_text().count("is up with") == 1
    finally:
        sched.stop()


def test_dispynodes_scheduler_host_registers_on_the_default_port() -> None:
    assert parse_args(["--scheduler_host", "10.1.2.3"]).register == "10.1.2.3:9714"
    assert parse_args(["--scheduler_node", "sched:9800"]).register == "sched:9800"
