"""A SharedJobCluster shows the real nodes behind the scheduler, with its own counts:
``status()``, ``print_status()``, ``node_jobs``, the cluster_status callback and the
web monitor's API; another user's jobs are not counted; a killed node leaves the
list."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dispynb import DispyNode, LocalCluster, SharedJobCluster
from dispynb.errors import MessageError, NotSupportedError
from dispynb.httpd import DispyHTTPServer
from dispynb.job import JobStatus
from dispynb.protocol.messages import SchedulerNodes, WireMessage
from dispynb.protocol.records import SharedNodeEntry
from schedserver.pulse import combined_figure
from tests.httpd.client import MonitorClient
from tests.sharedsched.harness import SchedulerProcess

pytestmark = pytest.mark.slow

WAIT = 20.0


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def by_address(cluster: SharedJobCluster) -> dict[str, DispyNode]:
    return {f"{n.ip_addr}:{n.port}": n for n in cluster.status().nodes}


def test_print_status_at_the_end_of_a_run_counts_all_its_jobs(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """dispy's sample ends with print_status() once its jobs are done: the table
    counts them all, as dispy's client counts each result. The counts come in the
    scheduler's reports (every second), after the results: before, the table
    printed at once left out the jobs of the last second (all of a short run)."""
    with SharedJobCluster(
        nap, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as alice:
        jobs = [alice.submit(0.0) for _ in range(8)]
        assert alice.wait(timeout=WAIT)
        assert {job.status for job in jobs} == {JobStatus.Finished}
        alice.print_status()
    rows = [line for line in capsys.readouterr().out.splitlines() if " | " in line]
    assert sum(int(row.split("|")[2]) for row in rows[1:]) == 8, rows  # Jobs


def test_status_print_status_and_monitor_list_the_nodes_behind_the_scheduler(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    addresses = sorted(nodes.node_specs())
    with (
        SharedJobCluster(
            nap, scheduler_host=scheduler.address, secret_file=str(users["alice"])
        ) as alice,
        SharedJobCluster(
            nap, scheduler_host=scheduler.address, secret_file=str(users["bob"])
        ) as bob,
    ):
        # The nodes are listed as they are set up (the first one at least once
        # the constructor returned, as for a JobCluster); never the scheduler.
        assert by_address(alice)
        wait_for(lambda: sorted(by_address(alice)) == addresses, "both nodes")
        assert all(node.cpus == 2 for node in alice.status().nodes)
        assert scheduler.address not in by_address(alice)
        quick = [alice.submit(0.01) for _ in range(8)]
        assert alice.wait(timeout=WAIT)
        wait_for(
            lambda: sum(n.jobs_done for n in alice.status().nodes) == 8,
            "alice's 8 jobs counted on the nodes",
        )
        assert all(n.jobs_done >= 1 for n in alice.status().nodes)  # both used
        assert all(n.cpu_time > 0 for n in alice.status().nodes)
        assert {job.status for job in quick} == {JobStatus.Finished}

        # Four long jobs fill the 4 CPUs: each node runs 2 of them for alice.
        long = [alice.submit(30.0) for _ in range(4)]
        wait_for(
            lambda: [n.busy for n in alice.status().nodes] == [2, 2],
            "alice's running jobs counted per node",
        )
        keys = sorted(job._key for job in long if job._key is not None)
        running = sorted(
            job._key for node in alice.status().nodes for job in alice.node_jobs(node)
        )
        assert running == keys
        assert alice.node_jobs("no-such-node") == []  # dispy's SharedJobCluster
        # Bob sees the same nodes, and none of alice's jobs on them.
        wait_for(lambda: sorted(by_address(bob)) == addresses, "bob's nodes")
        assert all(n.busy == 0 and n.jobs_done == 0 for n in bob.status().nodes)

        alice.print_status()
        table = capsys.readouterr().out
        for node in alice.status().nodes:  # dispy's rows: the name, or the address
            assert f" {(node.name or node.ip_addr)[:15]:>15} | " in table
        assert scheduler.address not in table

        monitor = DispyHTTPServer(alice, port=0, poll_sec=1)
        try:
            client = MonitorClient(monitor)
            reply = client.get("/api/cluster")
            assert reply.status == 200
            shown = {f"{n['ip_addr']}:{n['port']}": n for n in reply.json()["nodes"]}
            assert sorted(shown) == addresses
            assert [shown[a]["busy"] for a in addresses] == [2, 2]
            assert sum(shown[a]["jobs_done"] for a in addresses) == 8
            assert client.request("GET", "/api/cluster", auth=False).status == 403
            wrong = {"Authorization": "Token " + "x" * 40}
            assert (
                client.request("GET", "/api/cluster", headers=wrong, auth=False).status
                == 403
            )
            # A limit of alice's own use of the node (test_node_limits.py).
            csrf = reply.headers["x-csrf-token"]
            limited = client.request(
                "POST",
                f"/api/nodes/{addresses[0]}/cpus",
                headers={"X-CSRF-Token": csrf},
                body='{"cpus": 1}',
            )
            assert limited.status == 200
            assert limited.json() == {"node": addresses[0], "cpus": 1}
        finally:
            monitor.shutdown(wait=False)
        # As the migration guide says: only the scheduler sets a computation up on
        # its nodes (submit_node goes through: tests/sharedsched/test_submit_node.py;
        # so do the others: test_node_use.py, test_node_limits.py).
        # Its words say how instead, through a scheduler (they said to use
        # dispynb's own node servers, engine=None: no SharedJobCluster's choice).
        with pytest.raises(NotSupportedError) as raised:
            alice.resetup_node(alice.status().nodes[0])
        assert "close_node" in str(raised.value), raised.value
        assert "engine=None" not in str(raised.value), raised.value
        for job in long:
            alice.cancel(job)
        assert alice.wait(timeout=WAIT)


def text(size: int) -> str:
    return "x" * size


def test_a_job_names_the_node_behind_the_scheduler_that_ran_it(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As in dispy's SharedJobCluster: cluster_status hears Running and Finished
    with the node that ran the job, and that node counts the results it sent
    (Rcvd). Before, the client knew only the scheduler: the node was None, and
    Rcvd 0."""
    heard: list[tuple[int, str | None, int]] = []
    lock = threading.Lock()

    def cluster_status(status: int, node: DispyNode | None, job: object) -> None:
        if status in (JobStatus.Running, JobStatus.Finished):
            where = None if node is None else f"{node.ip_addr}:{node.port}"
            with lock:
                heard.append((status, where, getattr(job, "id", -1)))

    addresses = set(nodes.node_specs())
    with SharedJobCluster(
        text,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        cluster_status=cluster_status,
    ) as cluster:
        jobs = [cluster.submit_job_id(n, 1000) for n in range(6)]
        assert cluster.wait(timeout=WAIT)
        assert [job.result for job in jobs] == ["x" * 1000] * 6
        cluster.print_status()
        nodes_seen = cluster.status().nodes
    with lock:
        statuses = {(status, job) for status, _, job in heard}
        where = {where for _, where, _ in heard}
    assert statuses == {
        (s, n) for s in (JobStatus.Running, JobStatus.Finished) for n in range(6)
    }
    assert where <= addresses, where  # never None, never the scheduler
    rcvd = {f"{n.ip_addr}:{n.port}": n.rx for n in nodes_seen}
    ran = {f"{n.ip_addr}:{n.port}": n.jobs_done for n in nodes_seen}
    for address, received in rcvd.items():  # 1000 bytes and more per result
        assert received >= 1000 * ran[address], (address, rcvd, ran)
    assert sum(rcvd.values()) >= 6000
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()]
    rows = [row for row in rows[2:] if len(row) == 7]  # print_status's node rows
    assert rows and all(row[6].strip() != "0 B" for row in rows if int(row[2])), rows


def length(data: bytes) -> int:
    return len(data)


def test_print_status_counts_the_bytes_sent_to_each_node_behind_the_scheduler(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """dispy's scheduler counts what it sends each node for a SharedJobCluster
    (its jobs, the files sent) and the client shows it: print_status's Sent
    column showed 0 B for every node, and ``DispyNode.tx`` was 0."""
    with SharedJobCluster(
        length, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        jobs = [cluster.submit(bytes(100_000)) for _ in range(6)]
        assert cluster.wait(timeout=WAIT)
        assert [job.result for job in jobs] == [100_000] * 6
        cluster.print_status()
        nodes_seen = cluster.status().nodes
    sent = {f"{n.ip_addr}:{n.port}": n.tx for n in nodes_seen}
    ran = {f"{n.ip_addr}:{n.port}": n.jobs_done for n in nodes_seen}
    assert sum(ran.values()) == 6, ran
    for address, count in sent.items():  # 100 kB and more per job
        assert count >= 100_000 * ran[address], (address, sent, ran)
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()]
    rows = [row for row in rows[2:] if len(row) == 7]  # print_status's node rows
    assert rows and all(row[5].strip() != "0 B" for row in rows if int(row[2])), rows


def test_a_job_queued_at_the_scheduler_names_no_node_until_it_runs(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """dispy's SharedJobCluster job has no ip_addr until the scheduler reports it
    Running; a job waiting in the scheduler's queue named the scheduler."""
    with SharedJobCluster(
        nap, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        running = [cluster.submit(30.0) for _ in range(4)]  # the 4 CPUs
        wait_for(
            lambda: all(job.status == JobStatus.Running for job in running),
            "4 jobs running",
        )
        queued = cluster.submit(0.0)
        assert cluster.status().jobs_pending == 5
        assert queued.status == JobStatus.Created
        assert queued.ip_addr is None
        assert all(job.ip_addr is not None for job in running)
        for job in running:
            cluster.cancel(job)
        assert queued.finish.wait(WAIT) and queued.result == 0.0
        assert queued.ip_addr is not None
        assert cluster.wait(timeout=WAIT)


def test_a_killed_node_leaves_the_list(
    scheduler: SchedulerProcess, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    closed: list[str] = []
    lock = threading.Lock()

    def cluster_status(status: int, node: DispyNode | None, job: object) -> None:
        if status == DispyNode.Closed and node is not None:
            with lock:
                closed.append(f"{node.ip_addr}:{node.port}")

    killed, kept = nodes.node_specs()
    with SharedJobCluster(
        nap,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        cluster_status=cluster_status,
        reentrant=True,
    ) as cluster:
        monitor = DispyHTTPServer(cluster, port=0, poll_sec=1)
        try:
            wait_for(
                lambda: sorted(by_address(cluster)) == sorted([killed, kept]),
                "both nodes",
            )
            os.kill(nodes.pids[0], signal.SIGKILL)
            wait_for(lambda: list(by_address(cluster)) == [kept], "node left")
            reply = MonitorClient(monitor).get("/api/cluster")
            assert [f"{n['ip_addr']}:{n['port']}" for n in reply.json()["nodes"]] == [
                kept
            ]
            wait_for(lambda: killed in closed, "cluster_status told of the loss")
            assert cluster.submit(0.01)() == 0.01  # the other node runs it
        finally:
            monitor.shutdown(wait=False)


def test_the_report_is_a_named_message_that_checks_its_entries() -> None:
    entry = SharedNodeEntry(
        "10.0.0.2:9701", "n2", "10.0.0.2", 9701, 4, 3, 1.5, [7], 1, []
    )
    message = SchedulerNodes(comp_id=1, nodes=[entry.to_wire()])
    again = WireMessage.from_header(message.to_header())
    assert isinstance(again, SchedulerNodes)
    assert SharedNodeEntry.from_wire(again.nodes[0]) == entry
    for bad in (["x"], [*entry.to_wire()[:9], "many"], [1, *entry.to_wire()[1:]]):
        with pytest.raises(MessageError):
            SharedNodeEntry.from_wire(bad)
    # A node that cannot read a figure now (out of descriptors) says None.
    unknown = entry._replace(avail=[None, None, 1e10, None])
    assert SharedNodeEntry.from_wire(unknown.to_wire()) == unknown
    with pytest.raises(MessageError):
        SharedNodeEntry.from_wire(entry._replace(avail=["full"]).to_wire())


def test_the_schedulers_sum_of_its_nodes_figures_is_unknown_if_one_is() -> None:
    assert combined_figure((40.0, 60.0), mean=True) == 50.0
    assert combined_figure((1e9, 2e9), mean=False) == 3e9
    # Not the sum of those that know, which would say less is free than is.
    assert combined_figure((1e9, None), mean=False) is None


def test_a_node_status_event_comes_only_when_its_figures_change(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """Each report of the scheduler carries every node's figures; one that comes
    because counts changed (a job ended) carries the figures as they were. Before,
    the client told of a new status (cluster_status, DispyNode.AvailInfo) on every
    report: it compared the figures' DispyNodeAvailInfo objects by identity. The
    nodes report their figures every 600 s here (the scheduler's pulse), the client
    asks for a report every 0.1 s (its own pulse)."""
    sched = SchedulerProcess(
        tmp_path, nodes.node_specs(), nodes.secret, args=("--pulse_interval", "600")
    )
    sched.start()
    seen: dict[str, list[tuple[float, ...] | None]] = {}
    lock = threading.Lock()

    def cluster_status(status: int, node: DispyNode | None, job: object) -> None:
        if node is None or status not in (DispyNode.Initialized, DispyNode.AvailInfo):
            return
        avail = node.avail_info
        figures = None
        if avail is not None:
            figures = (avail.cpu, avail.memory, avail.disk, avail.swap)
        with lock:
            seen.setdefault(f"{node.ip_addr}:{node.port}", []).append(figures)

    try:
        with SharedJobCluster(
            nap,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            cluster_status=cluster_status,
            pulse_interval=0.1,
        ) as cluster:
            addresses = sorted(nodes.node_specs())
            wait_for(lambda: sorted(by_address(cluster)) == addresses, "both nodes")
            for done in range(1, 11):  # a report of new counts after each job
                job = cluster.submit(0.0)
                assert job.finish.wait(WAIT) and job.result == 0.0
                wait_for(
                    lambda done=done: (
                        sum(n.jobs_done for n in cluster.status().nodes) == done
                    ),
                    f"the report that {done} jobs are done",
                )
            assert all(n.avail_info is not None for n in cluster.status().nodes)
    finally:
        sched.stop()
    with lock:
        assert sorted(seen) == addresses
        for address, figures in seen.items():
            # Each event told of figures other than those known before it.
            repeated = [a for a, b in itertools.pairwise(figures) if a == b]
            assert not repeated, (address, len(figures), figures)
