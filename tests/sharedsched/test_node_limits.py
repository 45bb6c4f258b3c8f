"""``set_node_cpus`` and ``close_node`` through a shared scheduler, as dispy's
SharedJobCluster has them, for this cluster alone: a limit bounds its own jobs on
the node (never another user's), a node closed runs none of its jobs (its cleanup
runs, the jobs it held that had not started run elsewhere) until ``allocate_node``
names it. Real node servers and a real scheduler process."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb import DispyNode, LocalCluster, SharedJobCluster
from dispynb.httpd import DispyHTTPServer
from dispynb.job import JobStatus
from tests.httpd.client import MonitorClient
from tests.jobs import wait_until
from tests.nodeproc import start_node
from tests.sharedsched.harness import SchedulerProcess, add_user, env_for
from tests.sharedsched.nodeuse import alice_and_bob, by_name, held, overlapped

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PROGRAMS = Path(__file__).parent / "programs"


def test_set_node_cpus_limits_the_clusters_own_jobs_on_the_node(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = nodes.names
    with alice_and_bob(scheduler.address, users, [first, second]) as (alice, bob):
        node = by_name(alice)[first]
        assert alice.set_node_cpus(node, 1) == 1
        assert by_name(alice)[first].cpus == 1
        # Three of alice's jobs pinned there run one at a time...
        pinned = [alice.submit_node(node, 0.3) for _ in range(3)]
        assert [job() for job in pinned if job is not None] == [first] * 3
        assert not overlapped(pinned)  # type: ignore[arg-type]
        # ... and hers that may run anywhere use the other node's 2 CPUs too.
        spread = [alice.submit(0.5) for _ in range(6)]
        assert {job() for job in spread} == {first, second}
        # Bob's use of the node is his: both his jobs pinned there run at once.
        wait_until(lambda: by_name(bob)[first].cpus == 2)
        his = [bob.submit_node(first, 0.5) for _ in range(2)]
        assert [job() for job in his if job is not None] == [first] * 2
        assert overlapped(his)  # type: ignore[arg-type]

        # As JobCluster's: negative leaves that many out, more than the node has
        # is what it has, a negative past it changes nothing, a string is a number.
        assert alice.set_node_cpus(first, -1) == 1
        assert alice.set_node_cpus(first, 64) == 2
        assert alice.set_node_cpus(first, "1") == 1
        assert alice.set_node_cpus(first, -5) == 1
        # 0 is deallocate_node: submit_node to it returns None until given back.
        assert alice.set_node_cpus(first, 0) == 0
        assert alice.submit_node(first, 0.0) is None
        assert {alice.submit(0.0)() for _ in range(3)} == {second}
        assert alice.set_node_cpus(first, 1) == 1
        assert alice.allocate_node(first) == 0  # all of it again, as JobCluster's
        assert by_name(alice)[first].cpus == 2
        submitted = alice.submit_node(first, 0.0)
        assert submitted is not None and submitted() == first
        with caplog.at_level(logging.WARNING, logger="dispynb.cluster"):
            assert alice.set_node_cpus(first, "many") == -1
            assert alice.set_node_cpus("no-such-node", 1) == -1
        assert "cpus='many' is not a number of CPUs" in caplog.text
        assert "none of the nodes the scheduler runs this cluster on" in caplog.text
    log = scheduler.log_text()
    assert f"alice/where: its client limited node {node.ip_addr}:" in log


def test_close_node_closes_the_clusters_computation_there_until_allocated(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = nodes.names
    marks, release = tmp_path / "marks", tmp_path / "release"
    marks.mkdir()
    args = (str(marks), str(release))
    events: list[tuple[int, str]] = []

    def cluster_status(status: int, node: DispyNode | None, job: object) -> None:
        if node is not None and job is None:
            events.append((status, node.name))

    with SharedJobCluster(
        held,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        cluster_status=cluster_status,
    ) as alice:
        wait_until(lambda: sorted(by_name(alice)) == [first, second])
        node = by_name(alice)[first]
        (release.parent / "warm").touch()  # one job there first: its mean is known
        warm = alice.submit_node(node, -1, str(marks), str(release.parent / "warm"))
        assert warm is not None and warm() == first
        # All its jobs to the first node: two run there, the others wait there
        # (sent ahead), two of them pinned to it.
        assert alice.deallocate_node(second) == 0
        jobs = [alice.submit(n, *args) for n in range(4)]
        pinned = [alice.submit_node(node, n, *args) for n in (10, 11)]
        wait_until(lambda: len(list(marks.iterdir())) == 3)  # -1, 0, 1 ran

        with caplog.at_level(logging.INFO, logger="dispynb.cluster"):
            assert alice.close_node(node) == 0
            # The pinned ones are cancelled; the others wait for a node.
            wait_until(lambda: all(j.status == JobStatus.Cancelled for j in pinned))
            release.touch()  # the running ones finish there
            assert [job() for job in jobs[:2]] == [first, first]
            wait_until(lambda: first not in by_name(alice))
            # Said on the client's loop thread as it drops the node: maybe just after.
            released = f"node {node.ip_addr}:{node.port} released (close_node)"
            wait_until(lambda: released in caplog.text)
        assert f"{node.ip_addr}:{node.port} left" not in caplog.text
        wait_until(lambda: (DispyNode.Closed, first) in events)  # (its thread)
        assert [job.status for job in jobs[2:]] == [JobStatus.Created] * 2
        assert alice.submit_node(first, 0, *args) is None
        assert alice.allocate_node(second) == 0
        assert [job() for job in jobs[2:]] == [second, second]
        assert sorted(path.name for path in marks.iterdir()) == [
            "-1",
            "0",
            "1",
            "2",
            "3",
        ]

        # Named again: set up there again; terminate_pending ends its jobs there.
        assert alice.allocate_node(first) == 0
        wait_until(lambda: first in by_name(alice))
        release.unlink()
        running = alice.submit_node(first, 20, *args)
        assert running is not None
        wait_until(lambda: (marks / "20").exists())
        assert alice.close_node(first, terminate_pending=True) == 0
        # As a JobCluster's, and dispy's: the job the node terminated ends so.
        assert running() is None
        assert running.status == JobStatus.Terminated
        assert "terminated at the client's request" in str(running.exception)
        release.touch()


def test_the_monitor_says_why_a_nodes_limit_cannot_apply(
    tmp_path: Path,
) -> None:
    """A node that shuts down (SIGTERM, draining its running job) still lists in
    the cluster, but takes no limit: the web monitor answers why, not 404 or 500."""
    marks, release = tmp_path / "marks", tmp_path / "release"
    marks.mkdir()
    node_server = start_node(tmp_path / "node", cpus=1)
    credential = add_user(tmp_path, "alice")
    scheduler = SchedulerProcess(tmp_path, [node_server.spec], node_server.secret)
    try:
        scheduler.start()
        with SharedJobCluster(
            held, scheduler_host=scheduler.address, secret_file=str(credential)
        ) as alice:
            wait_until(lambda: len(alice.status().nodes) == 1)
            job = alice.submit(0, str(marks), str(release))
            wait_until(lambda: (marks / "0").exists())
            monitor = DispyHTTPServer(alice, port=0, poll_sec=1)
            try:
                client = MonitorClient(monitor)
                path = f"/api/nodes/{node_server.spec}/cpus"
                assert client.post(path, {"cpus": 1}).json()["cpus"] == 1
                node_server.proc.send_signal(signal.SIGTERM)
                scheduler.wait_for_log("shuts down: no more jobs for it")
                refused = client.post(path, {"cpus": 1})
                assert refused.status == 409, refused.json()
                assert refused.json()["reason"] == (
                    f"node '{node_server.spec}': node {node_server.spec} shuts "
                    "down: it takes no more jobs"
                )
            finally:
                monitor.shutdown(wait=False)
            release.touch()
            assert job() is not None
    finally:
        release.touch()
        scheduler.stop()
        node_server.stop()


def test_a_dispy_program_manages_the_nodes_behind_the_scheduler(
    scheduler: SchedulerProcess, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """`programs/shared_node_methods.py`, as a dispy user writes it."""
    env = env_for(
        DISPYNB_TEST_SCHEDULER=scheduler.address,
        DISPYNB_SECRET_FILE=str(users["alice"]),
    )
    done = subprocess.run(
        [sys.executable, str(PROGRAMS / "shared_node_methods.py")],
        env=env,
        cwd=PROGRAMS,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "set_node_cpus(local-0, 1): 1",
        "local-0 cpus: 1",
        "one at a time on local-0: True",
        "set_node_cpus(local-0, -1): 1",
        "set_node_cpus(local-0, 8): 2",
        "deallocate_node(local-0): 0",
        "jobs ran on: ['local-1']",
        "allocate_node(local-0): 0",
        "pinned job after allocate_node ran on: local-0",
        "close_node(local-1): 0",
        "nodes: ['local-0']",
        "jobs ran on: ['local-0']",
        "allocate_node(local-1): 0",
        "nodes: ['local-0', 'local-1']",
    ], done.stderr


def test_a_closed_node_that_comes_back_is_not_set_up_again_until_allocated(
    tmp_path: Path,
) -> None:
    """The node restarts on its address: the scheduler sets the other users'
    computations up there again, not the one whose client closed it."""
    kept = start_node(tmp_path / "kept", name="kept", cpus=2)
    closed = start_node(tmp_path / "closed", name="closed", cpus=2)
    alice, bob = add_user(tmp_path, "alice"), add_user(tmp_path, "bob")
    scheduler = SchedulerProcess(tmp_path, [kept.spec, closed.spec], kept.secret)
    try:
        scheduler.start()
        with alice_and_bob(
            scheduler.address, {"alice": alice, "bob": bob}, ["closed", "kept"]
        ) as (hers, his):
            assert hers.close_node("closed") == 0
            wait_until(lambda: sorted(by_name(hers)) == ["kept"])
            closed.stop()
            wait_until(lambda: sorted(by_name(his)) == ["kept"])
            closed = start_node(
                tmp_path / "closed", "--port", str(closed.port), name="closed", cpus=2
            )
            wait_until(lambda: sorted(by_name(his)) == ["closed", "kept"])
            assert his.submit_node("closed", 0.0)() == "closed"
            # Set up for bob, not for her: her jobs all run on the other node.
            spread = [hers.submit(0.3) for _ in range(6)]  # for 4 CPUs, if both
            assert {job() for job in spread} == {"kept"}
            assert sorted(by_name(hers)) == ["kept"]
            assert hers.allocate_node(closed.spec) == 0
            wait_until(lambda: sorted(by_name(hers)) == ["closed", "kept"])
            assert hers.submit_node("closed", 0.0)() == "closed"
    finally:
        scheduler.stop()
        closed.stop()
        kept.stop()
