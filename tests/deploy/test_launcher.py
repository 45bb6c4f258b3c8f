"""The launcher contract (`NodeLauncher`) with a cluster, on this machine: a launcher
that starts ``dispynb-node --register`` processes locally, as SSH or SLURM would
elsewhere."""

from __future__ import annotations

import asyncio
import gc
import itertools
import subprocess
import sys
import threading
import time
import weakref

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.deploy import LaunchError, NodeLauncher
from tests.nodeproc import node_env
from tests.sigint import SigintAtCReturn, python_handles_sigint

pytestmark = pytest.mark.slow


class LocalProcesses(NodeLauncher[asyncio.subprocess.Process]):
    """Nodes as local processes, the secret on their stdin."""

    def __init__(
        self,
        *,
        extra: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        register_host: str | None = "127.0.0.1",
        **kwargs: object,
    ) -> None:
        self.extra = extra
        self.host = host  # where the nodes listen, and register from
        super().__init__(register_host=register_host, **kwargs)  # type: ignore[arg-type]

    async def _register_to(self, index: int) -> str:
        return self.host

    async def _launch(
        self, index: int, name: str, register_to: str
    ) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nodeserver", "--secret-stdin", "--parent-pipe",
            "0", "--register", register_to, "--name", name, "--host", self.host,
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


class Unregistered(NodeLauncher[str]):
    """Nodes launched that have not registered yet (slow hosts, say)."""

    async def _launch(self, index: int, name: str, register_to: str) -> str:
        return name

    async def _stop(self, handle: str) -> None:
        pass

    def _exit_reason(self, handle: str) -> str | None:
        return None


def test_ctrl_c_anywhere_in_a_wait_for_nodes_is_a_keyboard_interrupt() -> None:
    """A Ctrl-C after each C call ``wait_for`` makes in turn: each wait ends in
    `KeyboardInterrupt`, and the launcher's lock is free for its other threads.
    With a ``threading.Condition``, one landing as its ``wait`` let the lock go
    raised RuntimeError('cannot release un-acquired lock'), and one landing in
    its ``__enter__`` left the lock held for ever."""
    outcomes: list[str] = []
    with Unregistered(register_host="127.0.0.1") as nodes, python_handles_sigint():
        nodes.start(1)
        for point in itertools.count(1):
            sigint = SigintAtCReturn(point)
            try:
                sys.setprofile(sigint)
                nodes.wait_for(timeout=0.05)
            except KeyboardInterrupt:
                outcomes.append("KeyboardInterrupt")
            except LaunchError:  # not interrupted
                if not sigint.sent:  # past the wait's last C call
                    break
            except RuntimeError as exc:
                outcomes.append(repr(exc))
            finally:
                sys.setprofile(None)
        other = threading.Thread(target=nodes.exited, daemon=True)  # takes the lock
        other.start()
        other.join(10)
        assert not other.is_alive(), "the launcher's lock is held for ever"
    assert len(outcomes) > 10  # each point in the wait was tried
    assert set(outcomes) == {"KeyboardInterrupt"}, outcomes


def test_nodes_that_cannot_start_give_a_clear_error() -> None:
    with LocalProcesses(extra=("--no-such-option",)) as nodes:
        nodes.start(2)
        with pytest.raises(
            LaunchError, match=r"exited before registering.*exited with status 2"
        ):
            nodes.node_specs()


def test_executor_on_launched_nodes() -> None:
    from dispynb import Executor

    with LocalProcesses() as nodes:
        nodes.start(2)
        with Executor(nodes=nodes) as executor:
            assert list(executor.map(abs, [-1, -2, -3])) == [1, 2, 3]


@pytest.mark.parametrize("register_host", ["::1", None])
def test_nodes_register_over_ipv6(register_host: str | None) -> None:
    """Nodes told to register with ``[::1]:PORT`` (the listener on ``::1``, or the
    default one on every address of both families) run the cluster's jobs."""
    with LocalProcesses(host="::1", register_host=register_host) as nodes:
        nodes.start(1)
        assert nodes.node_specs() == [f"[::1]:{nodes.nodes[0].port}"]
        with JobCluster(square, nodes=nodes) as cluster:
            assert [cluster.submit(i)() for i in range(3)] == [0, 1, 4]
            assert [n.ip_addr for n in cluster.status().nodes] == ["::1"]


def test_unsubscribe_stops_the_callbacks_and_a_closed_cluster_unsubscribes() -> None:
    with LocalProcesses() as nodes:
        seen: list[tuple[str, int]] = []
        nodes.subscribe(lambda host, port: seen.append((host, port)))
        gone: list[tuple[str, int]] = []

        def unsubscribed(host: str, port: int) -> None:
            gone.append((host, port))

        nodes.subscribe(unsubscribed)
        nodes.start(1)
        nodes.wait_for(1, timeout=30)
        nodes.unsubscribe(unsubscribed)
        nodes.unsubscribe(unsubscribed)  # unknown now: ignored
        nodes.start(1)
        nodes.wait_for(2, timeout=30)
        assert len(gone) == 1
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:  # on the I/O loop
            time.sleep(0.05)
        assert sorted(seen) == sorted(nodes.addresses)
        # A cluster subscribes while open; closed, it is no longer held (nor called).
        cluster = JobCluster(square, nodes=nodes)
        assert cluster.submit(3)() == 9
        cluster.close()
        ref = weakref.ref(cluster)
        del cluster
        gc.collect()
        assert ref() is None


def slow_square(x: int) -> int:
    time.sleep(1.0)
    return x * x


def test_scaling_down_loses_no_job_sent_ahead_to_the_node() -> None:
    """scale(0) (adapt's scale-down alike) drains a node that runs a job and holds
    the next one sent ahead behind it (its CPU busy): the running job finishes and
    the held one goes back to the queue, to run on the next node. It was cancelled
    (close_node had the node cancel what had not started): status Cancelled, result
    None, where the docs promise that a drain loses no job."""
    with LocalProcesses() as nodes:
        nodes.start(1)
        (spec,) = nodes.node_specs()
        with JobCluster(slow_square, nodes=nodes) as cluster:
            jobs = [cluster.submit(i) for i in range(2)]
            deadline = time.monotonic() + 30
            while True:  # the node has both: one running, one sent ahead
                load = cluster.workload().nodes.get(spec)
                running = jobs[0].status == DispyJob.Running
                if running and load is not None and load.jobs == 2:
                    break
                assert time.monotonic() < deadline, cluster.workload()
                time.sleep(0.01)
            nodes.scale(0)
            assert jobs[0]() == 0
            nodes.scale(1)  # a new node runs the job the drained one held
            assert jobs[1]() == 1, (jobs[1].status, jobs[1].exception)
            assert [job.status for job in jobs] == [DispyJob.Finished] * 2
