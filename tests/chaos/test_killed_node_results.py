"""Large job results in shared memory whose writers are killed: a node killed whole
(as a batch system kills its cgroup) after a worker wrote one, and a worker that
the out-of-memory killer ends as it writes one.

A result of at least a MiB for a client on the node's machine goes through
``/dev/shm`` (`dispynb.protocol.shm.write_result`): the client unlinks it as it
reads it, the node as it closes the computation. An object nobody is left to read
or unlink stays in RAM until the machine reboots. Real nodes from the command line,
in a cgroup of their own where the machine allows.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from dispynb.protocol import shm
from tests.chaos.outcomes import alive, assert_abandoned
from tests.chaos.test_tree_kill import cgroup_launcher, kill_tree, own_cgroup
from tests.jobs import wait_until
from tests.nodeproc import running_node, start_node
from tests.nodeserver.test_worker_deaths import memory_cgroup

pytestmark = pytest.mark.slow

MiB = 1 << 20


def wait_then_double(marks: str, go: str, data: bytes) -> bytes:
    """Write `own_prefix` to ``marks/started`` and a file ``output`` in its
    directory, wait for ``go`` (30 s at most); ``data`` twice."""
    import os
    import time

    from tests.chaos.test_killed_node_results import own_prefix

    with open("output", "w") as handle:  # what a user may keep (cleanup=False)
        handle.write(os.getcwd())
    with open(os.path.join(marks, ".started"), "w") as handle:
        handle.write(own_prefix())
    os.replace(os.path.join(marks, ".started"), os.path.join(marks, "started"))
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return data + data


def own_prefix() -> str:
    """In a job: how the names of its computation's result objects start (other
    tests' clients on this machine have theirs)."""
    import os

    from dispynb.protocol import shm

    return f"dnr-{shm.result_prefix(os.getcwd())}"  # the job's directory


def results_in_memory(prefix: str) -> dict[str, int]:
    """The result objects in /dev/shm whose names start with ``prefix``, with their
    sizes."""
    found = {}
    for path in shm.SHM_DIR.glob(f"{prefix}*"):
        try:
            found[path.name] = path.stat().st_size
        except FileNotFoundError:
            continue
    return found


def remove(names: set[str]) -> None:
    """Unlink what a failed test left in /dev/shm."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm.SHM_DIR / name)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cleanup", [True, False], ids=["cleanup", "kept"])
def test_a_result_in_shared_memory_is_freed_when_its_killed_node_starts_again(
    tmp_path: Path, cleanup: bool
) -> None:
    """The node server is stopped before the job returns, so that its result (4
    MiB) is written but reaches nobody; then the node and all its processes are
    killed together. Before, the object stayed; now the node started again on the
    same directory removes what the killed one left, its result objects too. A
    computation's directory kept on purpose (``cleanup=False``, as in dispy) stays
    with the files its jobs wrote, but its unread results in /dev/shm are nobody's
    and go too (before, only those of directories to remove went)."""
    marks, go = tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    written: set[str] = set()
    with own_cgroup() as group:
        launcher = cgroup_launcher(group)
        node = start_node(tmp_path / "node", cpus=1, launcher=launcher)
        try:
            with JobCluster(
                wait_then_double,
                nodes=[node.spec],
                secret=node.secret,
                pulse_interval=0.3,
                cleanup=cleanup,
            ) as cluster:
                data = os.urandom(2 * MiB)  # through shared memory, both ways
                job = cluster.submit(str(marks), str(go), data)
                wait_until(lambda: (marks / "started").exists(), timeout=30)
                prefix = (marks / "started").read_text()
                server = psutil.Process(node.proc.pid)
                pids = {server.pid} | {p.pid for p in server.children(True)}
                server.suspend()  # the result is reported to nobody
                go.touch()

                def written_whole() -> bool:
                    new = results_in_memory(prefix)
                    written.update(new)
                    return any(size >= 4 * MiB for size in new.values())

                wait_until(written_whole, timeout=30)
                kill_tree(node, group)
                assert cluster.wait(timeout=30)
                assert_abandoned([job], f"node {node.spec} was lost (")
                wait_until(lambda: not [pid for pid in pids if alive(pid)])
            # Nobody is left to unlink it.
            written.update(results_in_memory(prefix))
            assert results_in_memory(prefix)
            [output] = (tmp_path / "node").rglob("output")  # the job's file
            back = start_node(tmp_path / "node", cpus=1)
            try:
                wait_until(lambda: not results_in_memory(prefix))
                said = "removed 1 job result in shared memory (/dev/shm) that a node"
                wait_until(lambda: said in back.log_text())
                assert output.exists() is not cleanup  # kept: the user's
            finally:
                back.stop()
        finally:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
            remove(written)


def large_result(data: bytes, size: int) -> bytes | str:
    """``size`` bytes (``data`` came through shared memory: so does the result);
    `own_prefix` for none."""
    import os

    from tests.chaos.test_killed_node_results import own_prefix

    return os.urandom(1) * size if size else own_prefix()


@pytest.mark.timeout(90)
def test_a_worker_the_oom_killer_ends_as_it_writes_a_result_leaves_no_part_of_it(
    tmp_path: Path,
) -> None:
    """The node runs in a 330 MiB memory cgroup, as under a batch system: a job's
    200 MiB result fits (with the node's processes: some 250 MiB), its copy in
    ``/dev/shm`` (whose pages are charged to the cgroup) does not, and the kernel
    kills the worker as it writes it. Before, the part written stayed in /dev/shm
    for good, still charged to the node's memory; now it goes with its worker, and
    the next job's 64 MiB result comes back."""
    left: set[str] = set()
    data = os.urandom(2 * MiB)
    with memory_cgroup(330 * MiB) as cgroup:
        enter = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh"]
        try:
            with (
                running_node(tmp_path / "node", cpus=1, launcher=enter) as node,
                JobCluster(large_result, nodes=[node.spec], secret=node.secret) as c,
            ):
                prefix = c.submit(data, 0)()
                job = c.submit(data, 200 * MiB)
                job()
                left = set(results_in_memory(prefix))
                assert job.status == DispyJob.Terminated, job.exception
                assert "out-of-memory killer" in job.exception
                assert not left, left
                assert len(c.submit(data, 64 * MiB)()) == 64 * MiB
        finally:
            remove(left)


@pytest.mark.timeout(120)
def test_a_killed_nodes_results_are_freed_beside_a_running_node(
    tmp_path: Path,
) -> None:
    """Two nodes share a --dest-path (the default one is every node's of a user on
    the machine); one is killed whole after a worker wrote a result to /dev/shm
    that reached nobody. Before, a node started there while the other ran swept
    nothing (what was noted might be the running one's): the result stayed in RAM
    for as long as any node ran there. Now what the killed node noted goes, and
    the running node's own unreported result stays: its client gets it."""
    dest = tmp_path / "dest"
    written: set[str] = set()
    data = os.urandom(2 * MiB)  # through shared memory, both ways
    with own_cgroup() as group:
        killed = start_node(
            tmp_path / "killed",
            "--dest-path",
            str(dest),
            launcher=cgroup_launcher(group),
        )
        beside = start_node(tmp_path / "beside", "--dest-path", str(dest))
        try:
            with (
                JobCluster(
                    wait_then_double, nodes=[killed.spec], secret=killed.secret
                ) as lost,
                # Its node is stopped meanwhile, for longer than the 3 pulses
                # of 1 s (the default) after which a silent node is lost on a
                # loaded machine (a node started, another killed): pulses of a
                # minute.
                JobCluster(
                    wait_then_double,
                    nodes=[beside.spec],
                    secret=beside.secret,
                    pulse_interval=60,
                ) as held,
            ):
                prefixes = []
                jobs = []
                servers = []
                for cluster, node, name in (
                    (lost, killed, "lost"),
                    (held, beside, "held"),
                ):
                    marks, go = tmp_path / f"marks-{name}", tmp_path / f"go-{name}"
                    marks.mkdir()
                    jobs.append(cluster.submit(str(marks), str(go), data))
                    wait_until(lambda m=marks: (m / "started").exists(), timeout=30)
                    prefixes.append((marks / "started").read_text())
                    server = psutil.Process(node.proc.pid)
                    servers.append(server)
                    server.suspend()  # its result is reported to nobody yet
                    go.touch()

                def written_whole(prefix: str) -> bool:
                    new = results_in_memory(prefix)
                    written.update(new)
                    return any(size >= 4 * MiB for size in new.values())

                for prefix in prefixes:
                    wait_until(lambda p=prefix: written_whole(p), timeout=30)
                pids = {servers[0].pid} | {p.pid for p in servers[0].children(True)}
                kill_tree(killed, group)
                wait_until(lambda: not [pid for pid in pids if alive(pid)])
                assert results_in_memory(prefixes[0])  # nobody left to unlink it
                back = start_node(tmp_path / "back", "--dest-path", str(dest))
                try:
                    wait_until(lambda: not results_in_memory(prefixes[0]))
                    assert results_in_memory(prefixes[1])  # the running node's
                finally:
                    back.stop()
                servers[1].resume()
                assert held.wait(timeout=30)
                assert jobs[1]() == data + data
                assert lost.wait(timeout=30)
                assert_abandoned([jobs[0]], f"node {killed.spec} was lost (")
        finally:
            for node in (killed, beside):
                if node.proc.poll() is None:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        psutil.Process(node.proc.pid).resume()
                    node.stop()
            remove(written)
