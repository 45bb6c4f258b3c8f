"""dispy's node-management methods on a cluster with two local nodes."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from dispynb import DispyJob, DispyNode, JobCluster, LocalCluster, NodeAllocate
from dispynb.errors import ClusterError
from tests import jobs
from tests.jobs import WAIT, wait_for_path, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two() -> Iterator[LocalCluster]:
    """Two local nodes of 1 CPU each."""
    with LocalCluster(nodes=2, cpus=1) as cluster:
        yield cluster


def node_name(_: int) -> str:
    return dispy_node_name  # type: ignore[name-defined]  # noqa: F821


def by_name(cluster: JobCluster, name: str) -> DispyNode:
    return next(node for node in cluster.status().nodes if node.name == name)


def all_ready(cluster: JobCluster, count: int = 2) -> JobCluster:
    """JobCluster() returns once a first node is ready; wait for the others."""
    wait_until(lambda: len(cluster.status().nodes) == count)
    return cluster


def run_all(cluster: JobCluster, count: int = 6) -> set[str]:
    submitted = [cluster.submit(i) for i in range(count)]
    assert cluster.wait(timeout=WAIT)
    assert all(job.status == DispyJob.Finished for job in submitted)
    return {job.result for job in submitted}


def test_deallocate_node_gets_no_jobs_until_allocated_again(two):
    with JobCluster(node_name, nodes=two) as cluster:
        all_ready(cluster)
        assert run_all(cluster) == {"local-0", "local-1"}
        assert cluster.deallocate_node(by_name(cluster, "local-0")) == 0
        assert run_all(cluster) == {"local-1"}
        # As dispy's: a deallocated node takes no job pinned to it either (before,
        # the job waited, for ever unless the node was allocated again).
        assert cluster.submit_node(by_name(cluster, "local-0"), 0) is None
        assert cluster.submit_job_id_node("x", by_name(cluster, "local-0"), 0) is None
        assert cluster.allocate_node(by_name(cluster, "local-0")) == 0
        assert run_all(cluster, 12) == {"local-0", "local-1"}
        pinned = cluster.submit_node(by_name(cluster, "local-0"), 0)
        assert pinned is not None and pinned() == "local-0"


def test_allocate_node_without_a_node_returns_minus_one_as_dispys(two, caplog):
    """dispy's allocate_node(None) or ([]) finds no node to allocate: -1. It
    returned 0, having done nothing."""
    with JobCluster(node_name, nodes=two) as cluster:
        assert cluster.allocate_node(None) == -1
        assert cluster.allocate_node([]) == -1
        assert "allocate_node: no node given (None)" in caplog.text
        assert cluster.allocate_node(two.node_specs()[0]) == 0


def test_set_node_cpus_zero_then_back(two):
    with JobCluster(node_name, nodes=two) as cluster:
        node = by_name(all_ready(cluster), "local-1")
        assert cluster.set_node_cpus(node, 0) == 0
        assert run_all(cluster) == {"local-0"}
        assert cluster.set_node_cpus(node, 5) == 1  # never more than it set up
        assert cluster.set_node_cpus(node, -1) == 0  # all but one
        assert cluster.set_node_cpus("no-such-node", 1) == -1
        # As dispy's: a string is taken as its number, a negative count beyond the
        # node's CPUs changes nothing, and what is not a number is -1.
        assert cluster.set_node_cpus(node, "1") == 1
        assert cluster.set_node_cpus(node, -5) == 1
        assert cluster.set_node_cpus(node, "all") == -1
        assert node.cpus == 1


def test_set_node_cpus_leaves_avail_cpus_so_that_it_restores_them(local):
    """dispy's DispyNode.avail_cpus stays what the node offers when set_node_cpus
    changes ``cpus``: ``set_node_cpus(node, node.avail_cpus)`` gives them all back.
    Before, avail_cpus followed cpus down, and that call restored nothing."""
    with JobCluster(node_name, nodes=local) as cluster:
        node = cluster.status().nodes[0]
        assert (node.cpus, node.avail_cpus) == (2, 2)
        assert cluster.set_node_cpus(node, 1) == 1
        assert (node.cpus, node.avail_cpus) == (1, 2)
        assert cluster.set_node_cpus(node, node.avail_cpus) == 2
        assert (node.cpus, node.avail_cpus) == (2, 2)


def test_allocate_node_adds_a_node_not_given_at_start(two):
    first, second = two.node_specs()
    with JobCluster(node_name, nodes=[first], secret=two.secret) as cluster:
        assert run_all(cluster) == {"local-0"}
        assert cluster.allocate_node(second) == 0
        wait_until(lambda: len(cluster.status().nodes) == 2)
        assert run_all(cluster, 12) == {"local-0", "local-1"}


def test_close_node_runs_cleanup_and_removes_node(two, tmp_path):
    marker = tmp_path / "cleaned"
    statuses: list[int] = []

    def cleanup() -> None:
        with open(marker, "a") as handle:
            handle.write(dispy_node_name + "\n")  # type: ignore[name-defined]  # noqa: F821

    def cluster_status(
        status: int, node: DispyNode | None, job: DispyJob | None
    ) -> None:
        if job is None:
            statuses.append(int(status))

    with JobCluster(
        node_name, nodes=two, cleanup=cleanup, cluster_status=cluster_status
    ) as cluster:
        run_all(all_ready(cluster))
        assert cluster.close_node(by_name(cluster, "local-0")) == 0
        wait_until(lambda: len(cluster.status().nodes) == 1)
        # Its line, not only the file: the cleanup creates it, then writes.
        wait_until(lambda: marker.exists() and marker.read_text().endswith("\n"))
        assert marker.read_text() == "local-0\n"
        assert run_all(cluster) == {"local-1"}
    assert statuses.count(DispyNode.Closed) == 2  # local-0 at close_node, then local-1


class Version(NodeAllocate):
    """Gives each (re-)setup the next version number as setup_args."""

    version = 0

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        Version.version += 1
        self.setup_args = (Version.version,)
        return cpus


def test_resetup_node_runs_setup_again_with_new_setup_args(local1):
    def setup(version: int) -> int:
        global data_version
        data_version = version
        return 0

    def compute(_: int) -> int:
        return data_version  # type: ignore[name-defined]

    Version.version = 0
    node = Version(local1.node_specs()[0].split(":")[0], port=local1.addresses[0][1])
    with JobCluster(
        compute, nodes=[node], setup=setup, secret=local1.secret
    ) as cluster:
        assert cluster.submit(0)() == 1
        target = cluster.status().nodes[0]
        assert cluster.resetup_node(target) == 0
        job = cluster.submit(0)
        assert job.wait(timeout=WAIT)
        assert job.result == 2, job.exception


def test_node_jobs_lists_running_job(local1, tmp_path):
    marker = tmp_path / "running"
    with JobCluster(jobs.mark_and_sleep, nodes=local1) as cluster:
        job = cluster.submit(str(marker), 30)
        wait_for_path(marker)
        node = cluster.status().nodes[0]
        # Listed once the node told it started, as node.busy counts it.
        wait_until(lambda: job.status == DispyJob.Running)
        assert cluster.node_jobs(node) == [job]
        cluster.cancel(job)
        assert job.wait(timeout=WAIT)
        assert cluster.node_jobs(node) == []
        assert cluster.node_jobs("no-such-node") == -1  # as dispy's JobCluster


def test_node_jobs_lists_the_running_jobs_not_those_queued_at_the_node(
    local1, tmp_path
):
    """dispy's node_jobs: the jobs running on the node. A node is sent more jobs
    than it has CPUs (to hide latency); before, those waiting in its queue were
    listed too, Created, never started there."""
    release = str(tmp_path / "release")
    with JobCluster(jobs.mark_and_hold, nodes=local1) as cluster:
        node = cluster.status().nodes[0]
        running = cluster.submit(str(tmp_path / "first"), release)
        wait_for_path(tmp_path / "first")
        queued = cluster.submit(str(tmp_path / "second"), release)
        wait_until(lambda: jobs.jobs_held(cluster, node) == 2)  # sent to the node
        wait_until(lambda: running.status == DispyJob.Running)  # its start told
        assert queued.status == DispyJob.Created
        assert cluster.node_jobs(node) == [running]
        assert node.busy == 1
        open(release, "w").close()
        assert cluster.wait(timeout=WAIT)


def test_close_node_releases_node_for_good_until_allocated_again(two, tmp_path, caplog):
    events: list[tuple[int, str]] = []

    def cluster_status(
        status: int, node: DispyNode | None, job: DispyJob | None
    ) -> None:
        if job is None and node is not None and status != DispyNode.AvailInfo:
            events.append((int(status), node.name))

    with JobCluster(
        node_name, nodes=two, cluster_status=cluster_status, pulse_interval=0.2
    ) as cluster:
        run_all(all_ready(cluster))
        closed = by_name(cluster, "local-0")
        assert cluster.close_node(closed) == 0
        wait_until(lambda: len(cluster.status().nodes) == 1)
        driver = cluster._backend.driver
        # Released: no reconnection scheduled, no link left to it.
        assert driver._reconnecting == 0
        assert all(
            link.host != closed.ip_addr or link.port != closed.port
            for link in driver.nodes.values()
        )
        # Jobs for longer than a reconnection would take (0.5 s) and several pulses
        # all run on the other node; local-0 is never set up again.
        marker_jobs = [cluster.submit(i) for i in range(6)]
        sleepers = [
            cluster.submit_node(by_name(cluster, "local-1"), i) for i in range(2)
        ]
        assert cluster.wait(timeout=WAIT)
        assert {j.result for j in marker_jobs + sleepers} == {"local-1"}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dispynb"):
            assert cluster.close_node(closed) == -1  # not a node of the cluster now
        assert caplog.messages == [
            f"close_node: node {closed.ip_addr}:{closed.port} was released "
            "(close_node): allocate_node gives it back"
        ], caplog.text  # (it said nothing; then that it was no node of the cluster)
        # As dispy's, whose cluster keeps a closed node (print_status lists it):
        # it runs none of the cluster's jobs (it said -1, as for a stranger).
        assert cluster.node_jobs(closed) == []
        assert cluster.node_jobs("no-such-node") == -1
        # allocate_node brings it back.
        assert cluster.allocate_node(closed) == 0
        wait_until(lambda: len(cluster.status().nodes) == 2)
        assert run_all(cluster, 12) == {"local-0", "local-1"}
    initialized = [name for status, name in events if status == DispyNode.Initialized]
    assert sorted(initialized) == ["local-0", "local-0", "local-1"]
    closed_events = [name for status, name in events if status == DispyNode.Closed]
    assert closed_events[0] == "local-0"


def test_allocate_node_at_once_after_close_node_sets_the_node_up_again(two):
    """allocate_node while close_node is still under way (the node has not yet
    closed the computation): the node is set up again, and new jobs run there (they
    ended Terminated, 'the computation is not set up on this node', sent to the
    node while it closed the computation)."""
    first, _ = two.node_specs()
    with JobCluster(node_name, nodes=[first], secret=two.secret) as cluster:
        assert run_all(cluster, 2) == {"local-0"}
        node = by_name(cluster, "local-0")
        assert cluster.close_node(node) == 0
        assert cluster.allocate_node(first) == 0
        job = cluster.submit(0)
        assert job.wait(timeout=WAIT)
        assert (job.status, job.result, job.exception) == (
            DispyJob.Finished,
            "local-0",
            None,
        )
        assert run_all(cluster, 4) == {"local-0"}


def test_close_node_and_allocate_node_in_quick_turns_do_what_the_last_says(two):
    """close_node, allocate_node, close_node ... on one node, at once or a few ms
    apart (its close, or its setup again, still under way): each returns 0, and
    the node ends as the last call said. close_node returned -1 for a node being
    set up again, a second close sent to the node closed the setup made anew (the
    node was left neither set up nor released, its jobs waiting for ever), and an
    allocate_node as the node's close was answered was lost."""
    first, _ = two.node_specs()
    with JobCluster(node_name, nodes=[first], secret=two.secret) as cluster:
        assert run_all(cluster, 1) == {"local-0"}
        calls = []
        for delay in [0.0, 0.001, 0.003, 0.01, 0.03] * 4:
            calls.append(cluster.close_node(first))
            time.sleep(delay)  # lands in another phase of the close or setup
            calls.append(cluster.allocate_node(first))
            time.sleep(delay)
        assert calls == [0] * len(calls)
        assert run_all(cluster, 2) == {"local-0"}  # allocate_node was the last
        for _ in range(3):
            assert cluster.close_node(first) == 0
            assert cluster.allocate_node(first) == 0
        assert cluster.close_node(first) == 0  # close_node is the last now
        wait_until(lambda: not cluster.status().nodes)
        waiting = cluster.submit(0)
        assert not waiting.wait(timeout=0.5)  # released: no node runs it
        assert waiting.status == DispyJob.Created
        assert cluster.allocate_node(first) == 0
        assert waiting.wait(timeout=WAIT) and waiting.result == "local-0"


def test_jobs_submitted_after_close_node_of_the_only_node_wait_for_allocate_node(two):
    """As in dispy: with its only node released by close_node, a cluster queues new
    jobs until allocate_node brings a node (they ended Abandoned at once, 'no node is
    available to run the job')."""
    first, _ = two.node_specs()
    with JobCluster(node_name, nodes=[first], secret=two.secret) as cluster:
        assert run_all(cluster, 2) == {"local-0"}
        assert cluster.close_node(by_name(cluster, "local-0")) == 0
        wait_until(lambda: not cluster.status().nodes)
        waiting = [cluster.submit(i) for i in range(3)]
        assert all(job.status == DispyJob.Created for job in waiting)
        assert cluster.allocate_node(first) == 0
        assert cluster.wait(timeout=WAIT)
        assert [(job.status, job.result) for job in waiting] == [
            (DispyJob.Finished, "local-0")
        ] * 3


def test_jobs_waiting_for_a_released_node_are_cancelled_by_close(two):
    first, _ = two.node_specs()
    cluster = JobCluster(node_name, nodes=[first], secret=two.secret)
    try:
        assert run_all(cluster, 1) == {"local-0"}
        assert cluster.close_node(by_name(cluster, "local-0")) == 0
        wait_until(lambda: not cluster.status().nodes)
        waiting = cluster.submit(0)
    finally:
        cluster.close(terminate=True)
    assert waiting.status == DispyJob.Cancelled


def test_close_node_cancels_jobs_pinned_to_it_that_did_not_start(two, tmp_path):
    with JobCluster(jobs.mark_and_hold, nodes=two) as cluster:
        node = by_name(all_ready(cluster), "local-0")
        running = cluster.submit_node(node, str(tmp_path / "m1"), str(tmp_path / "r"))
        waiting = [
            cluster.submit_node(node, str(tmp_path / f"w{i}"), str(tmp_path / "r"))
            for i in range(3)
        ]
        wait_for_path(tmp_path / "m1")
        assert cluster.close_node(node) == 0
        (tmp_path / "r").touch()
        assert running.wait(timeout=WAIT)
        assert running.status == DispyJob.Finished  # its running job finished
        assert cluster.wait(timeout=WAIT)
        # Jobs still waiting for it (in the client, or queued on the node) never ran.
        assert {j.status for j in waiting} == {DispyJob.Cancelled}
        assert not any((tmp_path / f"w{i}").exists() for i in range(3))


def test_close_node_terminate_pending_ends_running_jobs_terminated(two, tmp_path):
    """As dispy's node reports the jobs it kills closing a computation: the running
    job ends ``Terminated`` (result None), told to ``job_status`` and to
    ``cluster_status`` with its node. It ended ``Abandoned``, "node ... was lost
    (released)": the node dropped the results of the jobs it terminated."""
    first, _ = two.node_specs()
    heard: list[tuple[str, int, str | None]] = []

    def job_status(job: DispyJob) -> None:
        heard.append(("job", int(job.status), None))

    def cluster_status(status: int, node: DispyNode | None, job: DispyJob | None):
        if job is not None and status == DispyJob.Terminated:
            heard.append(("cluster", int(status), node.name if node else None))

    with JobCluster(
        jobs.mark_and_hold,
        nodes=[first],
        secret=two.secret,
        job_status=job_status,
        cluster_status=cluster_status,
    ) as cluster:
        job = cluster.submit(str(tmp_path / "m"), str(tmp_path / "never"))
        wait_for_path(tmp_path / "m")
        node = by_name(cluster, "local-0")
        assert cluster.close_node(node, terminate_pending=True) == 0
        assert job.wait(timeout=WAIT)
        assert (job.status, job(), job.ip_addr) == (
            DispyJob.Terminated,
            None,
            node.ip_addr,
        )
        assert "terminated at the client's request" in str(job.exception)
        wait_until(lambda: len(heard) == 2)
    assert sorted(heard) == [
        ("cluster", DispyJob.Terminated, "local-0"),
        ("job", DispyJob.Terminated, None),
    ]


def test_print_status_still_counts_a_node_close_node_released(two, tmp_path, capsys):
    """dispy's cluster keeps a node close_node closed: print_status lists it with
    its jobs, the one it terminated too, and counts them in the total. The node
    and its jobs dropped out of the table."""
    first, _ = two.node_specs()
    with JobCluster(jobs.mark_and_hold, nodes=[first], secret=two.secret) as cluster:
        done = cluster.submit(str(tmp_path / "m0"), str(tmp_path))  # exists: returns
        assert done.wait(timeout=WAIT) and done.status == DispyJob.Finished
        held = cluster.submit(str(tmp_path / "m1"), str(tmp_path / "never"))
        wait_for_path(tmp_path / "m1")
        node = by_name(cluster, "local-0")
        assert cluster.close_node(node, terminate_pending=True) == 0
        assert held.wait(timeout=WAIT)
        wait_until(lambda: not cluster.status().nodes)
        capsys.readouterr()
        cluster.print_status()
        table = capsys.readouterr().out
    row = next((line for line in table.splitlines() if "local-0" in line), None)
    assert row is not None, table
    assert int(row.split("|")[2]) == 2  # its jobs: the one done, the one terminated


def test_close_node_again_with_terminate_pending_ends_the_running_job(two, tmp_path):
    """close_node(node) lets its running job finish; called again with
    terminate_pending before it has, the job is terminated, as dispy's node does
    on a second close. The second call changed nothing: the job ran on."""
    first, _ = two.node_specs()
    with JobCluster(jobs.mark_and_hold, nodes=[first], secret=two.secret) as cluster:
        job = cluster.submit(str(tmp_path / "m"), str(tmp_path / "never"), 60.0)
        wait_for_path(tmp_path / "m")
        node = by_name(cluster, "local-0")
        assert cluster.close_node(node) == 0
        assert cluster.close_node(node, terminate_pending=True) == 0
        assert job.wait(timeout=WAIT)
        assert (job.status, job()) == (DispyJob.Terminated, None)
        wait_until(lambda: not cluster.status().nodes)  # released, as asked


def test_resetup_node_runs_the_jobs_sent_ahead_to_the_node_after_its_setup(
    two, tmp_path
):
    """A job sent ahead to the node (waiting there behind the running one) runs
    once resetup_node has set the node up again, as in dispy, where it waits in
    the client's queue. It ended Cancelled, 'the node was closed for the
    computation (close_node)'."""
    first, _ = two.node_specs()
    release = str(tmp_path / "release")
    with JobCluster(jobs.mark_and_hold, nodes=[first], secret=two.secret) as cluster:
        node = by_name(cluster, "local-0")
        running = cluster.submit(str(tmp_path / "first"), release)
        wait_for_path(tmp_path / "first")
        queued = cluster.submit(str(tmp_path / "second"), release)
        wait_until(lambda: jobs.jobs_held(cluster, node) == 2)  # sent to the node
        assert cluster.resetup_node(node) == 0
        open(release, "w").close()
        assert cluster.wait(timeout=WAIT)
        assert [running.status, queued.status] == [DispyJob.Finished] * 2
        assert (tmp_path / "second").exists()


def test_resetup_node_keeps_the_node_and_its_job_counts(local1):
    def setup() -> int:
        return 0

    with JobCluster(jobs.square, nodes=local1, setup=setup) as cluster:
        assert [cluster.submit(i)() for i in range(4)] == [0, 1, 4, 9]
        node = cluster.status().nodes[0]
        assert node.jobs_done == 4
        cpu_time = node.cpu_time
        assert cluster.resetup_node(node) == 0
        wait_until(lambda: cluster.status().nodes == [node])  # the same DispyNode
        assert cluster.submit(5)() == 25
        assert cluster.status().nodes[0] is node
        assert node.jobs_done == 5
        assert node.cpu_time >= cpu_time
        assert node.busy == 0


def test_node_allocate_cpus_caps_cpus_not_the_cpus_the_node_offers(local):
    """dispy's DispyNode: ``cpus`` is what NodeAllocate.allocate gave the cluster,
    ``avail_cpus`` what the node has. NodeAllocate(cpus=1) on a 2-CPU node used to
    show avail_cpus 1 too."""
    (spec,) = local.node_specs()
    host, port = spec.rsplit(":", 1)
    seen: list[tuple[int, int]] = []

    def cluster_status(status: int, node: DispyNode | None, job: object) -> None:
        if status == DispyNode.Initialized and node is not None:
            seen.append((node.cpus, node.avail_cpus))

    with JobCluster(
        node_name,
        nodes=[NodeAllocate(host, int(port), cpus=1)],
        secret=local.secret,
        cluster_status=cluster_status,
    ) as cluster:
        (node,) = cluster.status().nodes
        assert (node.cpus, node.avail_cpus) == (1, 2)
        assert cluster.submit(0)() == node.name
    assert seen == [(1, 2)]


def test_a_node_without_swap_reports_all_of_it_available_as_dispys(local):
    """dispy's nodes report ``100 - psutil.swap_memory().percent``: 100 where there
    is no swap. dispynb's reported 0 there, so an allocate() written for dispy that
    skips nodes low on swap skipped every swapless node."""
    import psutil

    expected = 100.0 - psutil.swap_memory().percent
    with JobCluster(node_name, nodes=local, secret=local.secret) as cluster:
        avail = cluster.status().nodes[0].avail_info
        assert avail is not None
        assert avail.swap == pytest.approx(expected, abs=5.0)


def test_deallocate_node_and_set_node_cpus_on_a_node_allocated_again_a_moment_ago(
    two, caplog
):
    """close_node, allocate_node, then at once deallocate_node or set_node_cpus
    (the node's close, or its setup again, still under way): 0, or the CPUs it
    may use, as for a node in use, and the node, once set up again, gets none of
    the cluster's jobs, or that many at once. They returned -1: the node was
    none of the cluster's nodes at that moment."""
    first, second = two.node_specs()
    set_up: list[str] = []

    def cluster_status(status, node, job):
        if status == DispyNode.Initialized:
            set_up.append(node.name)

    with JobCluster(
        node_name,
        nodes=[first, second],
        secret=two.secret,
        cluster_status=cluster_status,
    ) as cluster:
        all_ready(cluster)
        calls = []
        for delay in [0.0, 0.002, 0.01, 0.03]:
            calls.append(cluster.close_node(first))
            time.sleep(delay)
            allocated = len(set_up)  # it is set up again after this
            calls.append(cluster.allocate_node(first))
            time.sleep(delay)
            calls.append(cluster.deallocate_node(first))
        assert calls == [0] * len(calls), caplog.text
        wait_until(lambda: "local-0" in set_up[allocated:])
        assert run_all(cluster) == {"local-1"}
        assert cluster.submit_node(first, 0) is None  # deallocated
        assert cluster.close_node(first) == 0
        allocated = len(set_up)
        assert cluster.allocate_node(first) == 0
        assert cluster.set_node_cpus(first, 1) == 1, caplog.text
        wait_until(lambda: "local-0" in set_up[allocated:])
        assert by_name(cluster, "local-0").cpus == 1
        assert run_all(cluster, 12) == {"local-0", "local-1"}


def test_node_methods_returning_minus_one_log_why(two, caplog):
    """deallocate_node, close_node and resetup_node of a node not of the cluster
    return -1, as dispy's, and say why at warning level, as set_node_cpus and
    allocate_node do (they said nothing: a program saw only -1)."""
    first, _ = two.node_specs()
    with JobCluster(node_name, nodes=[first], secret=two.secret) as cluster:
        for method in ("deallocate_node", "close_node", "resetup_node"):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="dispynb"):
                assert getattr(cluster, method)("no-such-node") == -1
            assert caplog.messages == [
                f"{method}: 'no-such-node' is not a node of this cluster"
            ], caplog.text


def test_submit_node_to_a_node_being_set_up_again_runs_there_once_it_is(two):
    """submit_node right after close_node and allocate_node (its close, or its
    setup again, under way), or after resetup_node: the job runs on the node once
    it is set up again, as the last call says. It ended Abandoned, 'node ...
    was lost (re-setup)', or submit_node returned None."""
    first, second = two.node_specs()
    with JobCluster(node_name, nodes=[first, second], secret=two.secret) as cluster:
        all_ready(cluster)
        pinned = []
        for delay in [0.0, 0.003, 0.01, 0.05, 0.2]:
            assert cluster.close_node(first) == 0
            time.sleep(delay)  # lands in another phase of the close or setup
            assert cluster.allocate_node(first) == 0
            pinned.append(cluster.submit_node(first, 0))
            assert cluster.resetup_node(second) == 0
            pinned.append(cluster.submit_node(second, 0))
            # (done before the next close_node, which cancels one not started)
            assert None not in pinned and all(j.wait(timeout=WAIT) for j in pinned)
            assert {(j.status, j.exception) for j in pinned} == {
                (DispyJob.Finished, None)
            }
            all_ready(cluster)  # (both set up again, for the next turn)
        assert [(job.status, job.exception) for job in pinned] == [
            (DispyJob.Finished, None)
        ] * len(pinned)
        assert [job.result for job in pinned] == ["local-0", "local-1"] * 5


class _Counting(NodeAllocate):
    """Gives ``setup`` the number of times its allocate() was asked (and when), and
    the file ``go`` its second run waits for."""

    asked: list[float] = []
    go = ""

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        self.asked.append(time.monotonic())
        self.setup_args = (len(self.asked), self.go)
        return cpus


def _slow_setup(count: int, go: str) -> int:
    """A setup; its second run (the first resetup_node's) lasts until ``go``
    exists: under way while the test calls resetup_node again (it slept 0.5 s, and
    a test slower than that called it on a node set up)."""
    import os
    import time

    global SETUP_COUNT
    SETUP_COUNT = count
    deadline = time.monotonic() + 30
    while count == 2 and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0


def _setup_count(_: int) -> int:
    return SETUP_COUNT  # type: ignore[name-defined]


def test_resetup_node_while_the_node_is_set_up_again_sets_it_up_anew(two, tmp_path):
    """resetup_node as the node's setup again (an earlier resetup_node's) is under
    way: 0, and the node is set up anew after it, its allocate() asked after the
    call, as the last call says. It returned -1 (the node was none of the
    cluster's nodes at that moment)."""
    first, _ = two.node_specs()
    host, port = first.rsplit(":", 1)
    allocation = _Counting(host, port=int(port))
    allocation.asked = []
    allocation.go = str(tmp_path / "go")
    with JobCluster(
        _setup_count, nodes=[allocation], setup=_slow_setup, secret=two.secret
    ) as cluster:
        assert cluster.submit(0)() == 1
        node = by_name(cluster, "local-0")
        assert cluster.resetup_node(node) == 0
        wait_until(lambda: len(allocation.asked) == 2)  # its setup again began
        called = time.monotonic()
        assert cluster.resetup_node(node) == 0
        (tmp_path / "go").touch()  # the setup under way may end
        wait_until(lambda: len(allocation.asked) == 3)
        assert allocation.asked[-1] > called
        assert cluster.submit(0)() == 3


def test_node_methods_of_a_closed_cluster_say_it_is_closed(two, caplog):
    """After close, a node's methods return what dispy's return for a node the
    cluster no longer has (node_jobs -1, the others -1, submit_node as submit),
    saying the cluster is closed. They raised RuntimeError ("run_sync() called on
    a released LoopRunner"), node_jobs too, called from another thread as the
    close went on."""
    first, _ = two.node_specs()
    cluster = JobCluster(node_name, nodes=[first], secret=two.secret)
    node = cluster.status().nodes[0]
    assert cluster.submit(0)() == node.name
    cluster.close()
    for name in (node, node.ip_addr, "no-such-node"):
        assert cluster.node_jobs(name) == -1
    with caplog.at_level(logging.WARNING, logger="dispynb"):
        for method in ("deallocate_node", "close_node", "resetup_node"):
            assert getattr(cluster, method)(node) == -1
        assert cluster.set_node_cpus(node, 1) == -1
        assert cluster.send_file(__file__, node) == -1
    assert caplog.messages == [
        f"{method}: the cluster is closed"
        for method in (
            "deallocate_node",
            "close_node",
            "resetup_node",
            "set_node_cpus",
            "send_file",
        )
    ], caplog.text
    with pytest.raises(ClusterError, match="this cluster is closed"):
        cluster.submit_node(node, 0)


def test_send_file_to_a_node_set_up_again_puts_it_there_and_keeps_those_sent(
    local1, tmp_path, monkeypatch
):
    """As dispy's node, which keeps the computation's directory through a
    resetup_node: a file sent before is still there after it, and one sent as the
    node closes the computation or as its setup runs again (send_file at once
    after resetup_node, as replace_inmem.py's user might) returns 0 and is there
    for the next job. It returned -1 ('... is not a node of this cluster', or 'the
    computation is not set up on this node'), and what was sent before was gone."""
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    gate.touch()
    marks.mkdir()

    def setup() -> int:
        import os
        import time

        open(os.path.join(str(marks), str(len(os.listdir(str(marks))))), "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(str(gate)) and time.monotonic() < deadline:
            time.sleep(0.01)
        return 0

    def read(names: list[str]) -> list[str | None]:
        import os

        return [open(n).read() if os.path.exists(n) else None for n in names]

    monkeypatch.chdir(tmp_path)
    for name in ("before", "closing", "setting_up"):
        (tmp_path / name).write_text(name)
    names = ["before", "closing", "setting_up"]
    with JobCluster(
        read, nodes=local1.node_specs(), setup=setup, secret=local1.secret
    ) as cluster:
        node = cluster.status().nodes[0]
        assert cluster.send_file("before", node) == 0
        gate.unlink()
        assert cluster.resetup_node(node) == 0
        assert cluster.send_file("closing", node) == 0
        wait_for_path(marks / "1")  # its setup runs again
        assert cluster.send_file("setting_up", node.ip_addr) == 0
        gate.touch()
        job = cluster.submit(names)
        assert job() == names, job.exception
        assert cluster.resetup_node(node) == 0
        job = cluster.submit(names)
        assert job() == names, job.exception
