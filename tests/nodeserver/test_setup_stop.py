"""A computation closed while its setup runs (Stop in a notebook, ``cluster.close``
during a long model load): the setup's process and what it started end at once,
the node acknowledges the close, and it is ready for the next computation.

Before, the computation process did not read the node's `Shutdown` until its setup
returned: the node acknowledged nothing (the client waited out its close timeout)
and the setup ran on, with its children, for nobody. Real ``python -m nodeserver``
processes and a real client connection.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path

import pytest

import dispynb.backends.nodes
import dispynb.scheduler.driver
from dispynb import JobCluster
from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    FINISHED,
    ComputationClose,
    ComputationClosed,
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    JobResults,
    JobSubmit,
    Message,
)
from dispynb.transport.connection import Connection
from dispynb.transport.connector import connect
from tests.jobs import WAIT, hold_with_a_child, square, still_running, wait_until
from tests.nodeproc import CliNode, running_node

pytestmark = pytest.mark.slow


async def _next(conn: Connection) -> tuple[Message, list[memoryview]]:
    """The node's next message other than a status report."""
    async with asyncio.timeout(WAIT):
        while True:
            message, buffers = await conn.recv()
            if message.op != "node-status":
                return message, buffers


async def _set_up_held(
    node: CliNode, tmp_path: Path, setup_timeout: float | None = None
) -> tuple[Connection, Path, Path]:
    """Connect to ``node`` and set up computation 1, whose setup holds with a child
    (`hold_with_a_child`); the connection, the setup's record and its release."""
    record, release = tmp_path / "record", tmp_path / "release"
    conn, _ = await connect(
        "127.0.0.1",
        node.port,
        secret=node.secret.encode(),
        max_message_size=1 << 24,
        name="stopper",
    )
    setup = functools.partial(hold_with_a_child, str(record), str(release))
    bundle = {"func": square, "setup": setup, "setup_args": ()}
    conn.write(
        ComputationSetup(
            comp_id=1, name="slow", workers=1, setup_timeout=setup_timeout
        ),
        serialize.dumps(bundle),
    )
    await conn.flush()
    return conn, record, release


async def _close_during_setup(node: CliNode, tmp_path: Path, terminate: bool) -> None:
    conn, record, release = await _set_up_held(node, tmp_path)
    try:
        async with asyncio.timeout(WAIT):
            while not record.exists():
                await asyncio.sleep(0.01)
        pids = [int(pid) for pid in record.read_text().split()]
        conn.write(ComputationClose(comp_id=1, terminate=terminate))
        # Acknowledged (not a ComputationFailed), once the setup's process and
        # its child are gone: the setup itself would hold for a minute.
        closed, _ = await _next(conn)
        assert isinstance(closed, ComputationClosed) and closed.comp_id == 1, closed
        assert still_running(pids) == []
        assert not release.exists()
        # The node (one CPU) serves the next computation.
        bundle = {"func": square, "setup": None, "setup_args": ()}
        conn.write(
            ComputationSetup(comp_id=2, name="next", workers=1),
            serialize.dumps(bundle),
        )
        ready, _ = await _next(conn)
        assert isinstance(ready, ComputationReady) and ready.comp_id == 2, ready
        args = serialize.dumps(((7,), {}))
        conn.write(JobSubmit(comp_id=2, jobs=[[1, 1, len(args)]]), args)
        while True:  # (a job's start may come first, in a message of its own)
            results, buffers = await _next(conn)
            assert isinstance(results, JobResults), results
            if results.results:
                break
        assert results.results[0][2] == FINISHED
        assert serialize.loads(buffers) == 49
    finally:
        release.touch()
        conn.close()


@pytest.mark.parametrize("terminate", [True, False], ids=["terminate", "plain"])
def test_a_close_during_setup_ends_it_at_once(tmp_path: Path, terminate: bool) -> None:
    """ComputationClose (with terminate, or plain: a setup has no jobs to wait
    for) while the setup runs: ComputationClosed comes, the setup's process and
    its child are gone by then, and the next computation runs."""
    with running_node(tmp_path / "node") as node:
        asyncio.run(_close_during_setup(node, tmp_path, terminate))
        assert "Traceback" not in node.log_text(), node.log_text()


@pytest.mark.parametrize("terminate", [True, False], ids=["terminate", "plain"])
def test_cluster_close_during_setup_returns_once_the_node_stopped_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminate: bool
) -> None:
    """``cluster.close()`` while a setup runs returns on the node's answer, not
    on its own timeout (an hour here: the test's bound would fail it), and the
    setup's processes are gone when it returns."""
    monkeypatch.setattr(dispynb.backends.nodes, "STARTUP_WAIT", 0.2)
    monkeypatch.setattr(dispynb.scheduler.driver, "CLOSE_TIMEOUT", 3600.0)
    monkeypatch.setattr(dispynb.scheduler.driver, "TERMINATE_CLOSE_TIMEOUT", 3600.0)
    record, release = tmp_path / "record", tmp_path / "release"
    setup = functools.partial(hold_with_a_child, str(record), str(release))
    with running_node(tmp_path / "node") as node:
        cluster = JobCluster(square, nodes=[node.spec], secret=node.secret, setup=setup)
        try:
            wait_until(record.exists)
            pids = [int(pid) for pid in record.read_text().split()]
            closing = threading.Thread(
                target=cluster.close, kwargs={"terminate": terminate}, daemon=True
            )
            closing.start()
            closing.join(WAIT)
            assert not closing.is_alive(), "close waited for its timeout"
            assert still_running(pids) == []
        finally:
            release.touch()
            cluster.close(terminate=True)
        with JobCluster(square, nodes=[node.spec], secret=node.secret) as again:
            assert again.submit(5)() == 25


async def _setup_timeout_expires(node: CliNode, tmp_path: Path) -> str:
    conn, record, release = await _set_up_held(node, tmp_path, setup_timeout=3.0)
    try:
        failed, _ = await _next(conn)
        assert isinstance(failed, ComputationFailed), failed
        # The setup wrote its record before the timeout (it holds for a minute).
        pids = [int(pid) for pid in record.read_text().split()]
        assert still_running(pids) == []
        return failed.message
    finally:
        release.touch()
        conn.close()


@pytest.mark.parametrize("zygote", ["1", "0"], ids=["zygote", "no-zygote"])
def test_a_setup_past_its_timeout_ends_with_what_it_started(
    tmp_path: Path, zygote: str
) -> None:
    """setup_timeout expires while the setup holds a child process: the node
    reports the timeout once the setup's process and its child are gone. Before,
    it killed the process alone: without a zygote (nothing sweeps orphans) the
    child ran on under init."""
    launcher = ["env", f"DISPYNB_ZYGOTE={zygote}"]
    with running_node(tmp_path / "node", launcher=launcher) as node:
        message = asyncio.run(_setup_timeout_expires(node, tmp_path))
        assert "setup_timeout" in message, message
