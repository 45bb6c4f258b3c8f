"""``send_file`` through the scheduler while one of the computation's nodes is lost:
the scheduler waited for that node's answer for ever, and its client gave up after
its whole timeout (30 s), failing a file every remaining node had."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from tests.jobs import wait_until
from tests.nodeproc import start_node
from tests.sharedsched.harness import SchedulerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def read_back(name: str) -> bytes:
    with open(name, "rb") as handle:
        return handle.read()


def test_send_file_is_answered_when_a_node_is_lost_before_placing_it(
    tmp_path: Path, users: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = [start_node(tmp_path / f"node{i}", cpus=1, name=f"n{i}") for i in (0, 1)]
    sched = SchedulerProcess(tmp_path, [n.spec for n in nodes], nodes[0].secret)
    try:
        sched.start()
        (tmp_path / "extra.bin").write_bytes(b"placed")
        monkeypatch.chdir(tmp_path)  # send_file keeps the path relative to it
        with SharedJobCluster(
            read_back, scheduler_host=sched.address, secret_file=str(users["alice"])
        ) as cluster:
            wait_until(lambda: len(cluster.status().nodes) == 2)
            nodes[0].proc.send_signal(signal.SIGSTOP)  # it will never answer
            answer: list[int] = []
            sender = threading.Thread(
                target=lambda: answer.append(
                    cluster.send_file("extra.bin", "127.0.0.1")
                )
            )
            sender.start()
            # n1 has it: the scheduler sent it to both nodes (in one go).
            wait_until(lambda: any((tmp_path / "node1").rglob("extra.bin")))
            nodes[0].proc.kill()  # lost, the file not placed there
            sender.join(25)  # well within the client's 30 s timeout
            assert not sender.is_alive(), "send_file still waits for the lost node"
            assert answer == [0]
            assert cluster.submit("extra.bin")() == b"placed"
    finally:
        sched.stop()
        for node in nodes:
            node.stop()
