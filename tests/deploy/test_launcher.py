"""The launcher contract (`NodeLauncher`) with a cluster, on this machine: a launcher
that starts ``dispynb-node --register`` processes locally, as SSH or SLURM would
elsewhere."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from dispynb import JobCluster
from dispynb.deploy import LaunchError, NodeLauncher
from tests.nodeproc import node_env

pytestmark = pytest.mark.slow


class LocalProcesses(NodeLauncher[asyncio.subprocess.Process]):
    """Nodes as local processes, the secret on their stdin."""

    def __init__(self, *, extra: tuple[str, ...] = (), **kwargs: object) -> None:
        self.extra = extra
        super().__init__(register_host="127.0.0.1", **kwargs)  # type: ignore[arg-type]

    async def _launch(
        self, index: int, name: str, register_to: str
    ) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nodeserver", "--secret-stdin", "--parent-pipe",
            "0", "--register", register_to, "--name", name, "--host", "127.0.0.1",
            "--port", "0", "--no-discovery", "--cpus", "1", *self.extra,
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=node_env(),
        )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(self.secret + b"\n")
        return proc

    async def _stop(self, handle: asyncio.subprocess.Process) -> None:
        if handle.stdin is not None:
            handle.stdin.close()
        try:
            await asyncio.wait_for(handle.wait(), 20)
        except TimeoutError:
            handle.kill()
            await handle.wait()

    def _exit_reason(self, handle: asyncio.subprocess.Process) -> str | None:
        code = handle.returncode
        return None if code is None else f"exited with status {code}"


def square(x: int) -> int:
    return x * x


def test_cluster_uses_launched_nodes_and_later_ones() -> None:
    with LocalProcesses() as nodes:
        nodes.start(1)
        cluster = JobCluster(square, nodes=nodes)
        try:
            assert len(cluster.status().nodes) == 1
            nodes.start(1)  # registers after the cluster started: used too
            nodes.wait_for(2, timeout=30)
            jobs = [cluster.submit(i) for i in range(6)]
            assert [job() for job in jobs] == [i * i for i in range(6)]
            cluster.wait()
            names = {n.name for n in nodes.nodes}
            assert len(names) == 2 and all(
                n.startswith("localprocesses-") for n in names
            )
        finally:
            cluster.close()
    # close() stopped the nodes
    assert all(x.handle.returncode is not None for x in nodes._launched if x.handle)


def test_nodes_that_cannot_start_give_a_clear_error() -> None:
    with LocalProcesses(extra=("--no-such-option",)) as nodes:
        nodes.start(2)
        with pytest.raises(
            LaunchError, match=r"did not register.*exited with status 2"
        ):
            nodes.node_specs()


def test_executor_on_launched_nodes() -> None:
    from dispynb import Executor

    with LocalProcesses() as nodes:
        nodes.start(2)
        with Executor(nodes=nodes) as executor:
            assert list(executor.map(abs, [-1, -2, -3])) == [1, 2, 3]
