"""A node holding the secret that stops reading what its client (or its shared
scheduler) sends, while it goes on sending its pulses (so it is rightly kept).

The client pinged each node every half pulse whether or not the node had taken
what was sent before: for a node that never reads, its queue grew without end.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from dispynb import JobCluster, SharedJobCluster
from dispynb.protocol.messages import JobResults, JobSubmit, NodeStatus, Ping
from dispynb.transport.connection import Connection
from tests.hostile.scripted import ScriptedNode, finished
from tests.hostile.tools import wait_for
from tests.sharedsched.harness import SchedulerProcess, add_user
from tests.transport.util import SECRET, serving_in_thread

pytestmark = pytest.mark.slow

#: The client's pulse (it pings every half pulse); seconds the node does not read.
PULSE = 0.2
STALL = 3.0


def echo(data: bytes) -> int:
    return len(data)


class StallingNode(ScriptedNode):
    """Stops reading at the first job (pulsing meanwhile); then reads again and
    counts the pings that were waiting for it."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = threading.Event()
        self.waiting_pings: int | None = None
        self._counting = False
        self._pings = 0
        self._stalled_on: Connection | None = None

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        if not self.stalled.is_set():
            conn.hold_reading(True)  # the attack: read nothing more for a while
            self._stalled_on = conn
            self.stalled.set()
            loop = asyncio.get_running_loop()
            end = loop.time() + STALL
            while loop.time() < end:
                conn.write(NodeStatus(avail=[50.0, 1e9, 1e9, 0.0]))
                await asyncio.sleep(PULSE / 2)
            # What waited is read at once (once this returns); later pings come
            # every PULSE / 2 s.
            self._counting = True
            conn.hold_reading(False)
            loop.call_later(PULSE, self._counted)
        for entry in message.jobs:
            conn.write(
                JobResults(comp_id=message.comp_id, results=[finished(*entry[:2])]),
                [b"\x80\x04K\x07."],  # pickle of 7
            )

    def _counted(self) -> None:
        self._counting = False
        self.waiting_pings = self._pings

    def other(self, conn: Connection, message: Any) -> None:
        if isinstance(message, Ping) and self._counting and conn is self._stalled_on:
            self._pings += 1


@pytest.mark.attack(
    id="never-reading-node",
    title=f"A node holding the secret reads nothing for {STALL:g} s while its "
    "client sends it 32 MiB of arguments, and pulses meanwhile",
    goal="no ping piles up for it while it does not take what was sent (was: one "
    f"every {PULSE / 2:g} s, without end for a node that never reads)",
)
@pytest.mark.timeout(60)
def test_pings_do_not_pile_up_for_a_node_that_does_not_read(measure) -> None:
    node = StallingNode()
    with serving_in_thread(node) as port:
        cluster = JobCluster(
            echo, nodes=[f"127.0.0.1:{port}"], secret=SECRET, pulse_interval=PULSE
        )
        try:
            first = cluster.submit(b"x")
            assert node.stalled.wait(20)
            second = cluster.submit(bytes(32 << 20))  # waits for the node to read
            assert first.wait(timeout=30) and second.wait(timeout=30)
            wait_for(lambda: node.waiting_pings is not None, "the pings counted")
        finally:
            cluster.close(terminate=True)
    measure(f"{node.waiting_pings} pings were waiting when it read again")
    assert node.waiting_pings is not None and node.waiting_pings <= 4


@pytest.mark.attack(
    id="sched-never-reading-node",
    title=f"A node of a shared scheduler reads nothing for {STALL:g} s while the "
    "scheduler sends it a user's 32 MiB of arguments, and pulses meanwhile",
    goal="no ping piles up for it while it does not take what was sent (was: one "
    "every pulse, without end for a node that never reads)",
)
@pytest.mark.timeout(60)
def test_the_scheduler_piles_no_ping_up_for_a_node_that_does_not_read(
    tmp_path: Path, measure
) -> None:
    node = StallingNode()
    credential = add_user(tmp_path, "alice")
    with (
        serving_in_thread(node) as port,
        SchedulerProcess(tmp_path, [f"127.0.0.1:{port}"], SECRET.decode()) as sched,
        SharedJobCluster(
            echo, scheduler_host=sched.address, secret_file=str(credential)
        ) as cluster,
    ):
        first = cluster.submit(b"x")
        assert node.stalled.wait(20)
        second = cluster.submit(bytes(32 << 20))
        assert first.wait(timeout=30) and second.wait(timeout=30)
        wait_for(lambda: node.waiting_pings is not None, "the pings counted")
    measure(f"{node.waiting_pings} pings were waiting when it read again")
    assert node.waiting_pings is not None and node.waiting_pings <= 2
