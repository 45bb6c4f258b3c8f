"""``close_node`` and ``allocate_node`` through a shared scheduler in quick turns
on one node, as `JobCluster`'s (tests/api/test_node_management.py): each call
returns 0 and the node ends as the last call says. Real node servers and a real
scheduler process."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.job import JobStatus
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess
from tests.sharedsched.nodeuse import by_name, held, overlapped, where

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_close_node_and_allocate_node_in_quick_turns_do_what_the_last_says(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """close_node, allocate_node, close_node ... on one node, at once or a few ms
    apart (its close, or its setup again, still under way at the scheduler):
    each returns 0, no node is said to have left the scheduler, and the node
    ends as the last call said."""
    first, second = nodes.names
    with SharedJobCluster(
        where, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as alice:
        wait_until(lambda: sorted(by_name(alice)) == [first, second])
        assert alice.deallocate_node(second) == 0  # its jobs: the first node's
        assert alice.submit(0.0)() == first
        node = by_name(alice)[first]
        with caplog.at_level(logging.WARNING, logger="dispynb"):
            calls = []
            for delay in [0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05] * 4:
                calls.append(alice.close_node(first))  # by name, or as a DispyNode
                time.sleep(delay)  # lands in another phase of the close or setup
                calls.append(alice.allocate_node(node))
                time.sleep(delay)
            assert calls == [0] * len(calls), caplog.text
            job = alice.submit(0.0)  # allocate_node was the last: runs there
            assert job() == first, job.exception
            for _ in range(3):
                assert alice.close_node(node) == 0
                assert alice.allocate_node(node) == 0
            assert alice.close_node(node) == 0  # close_node is the last now
            wait_until(lambda: first not in by_name(alice))
            waiting = alice.submit(0.0)
            assert not waiting.wait(timeout=1.0)  # released: no node runs it
            assert waiting.status == JobStatus.Created
            assert alice.allocate_node(node) == 0
            assert waiting() == first, waiting.exception
        assert "left the scheduler" not in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], (
            caplog.text
        )


def test_close_node_again_with_terminate_pending_ends_the_jobs_it_let_run(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    tmp_path: Path,
) -> None:
    """As dispy's, and a `JobCluster`'s: a first close_node lets the node's jobs
    run to their end; close_node again, with terminate_pending, while they run,
    terminates them. It returned -1 (the node was closed already) and the jobs
    ran on."""
    first, second = nodes.names
    marks, release = tmp_path / "marks", tmp_path / "release"
    marks.mkdir()
    with SharedJobCluster(
        held, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as alice:
        wait_until(lambda: sorted(by_name(alice)) == [first, second])
        running = alice.submit_node(first, 1, str(marks), str(release))
        assert running is not None
        wait_until(lambda: (marks / "1").exists())
        assert alice.close_node(first) == 0  # it runs on
        assert alice.close_node(first, terminate_pending=True) == 0
        assert running() is None
        assert running.status == JobStatus.Terminated, running.exception
        wait_until(lambda: first not in by_name(alice))
        assert alice.allocate_node(first) == 0  # set up there again
        wait_until(lambda: first in by_name(alice))
        release.touch()
        again = alice.submit_node(first, 2, str(marks), str(release))
        assert again is not None and again() == first


def test_deallocate_node_and_set_node_cpus_on_a_node_allocated_again_a_moment_ago(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """close_node, allocate_node, then at once deallocate_node or set_node_cpus
    (the node's close, or its setup again, still under way at the scheduler):
    0, or the CPUs it may use, as for a node in use; the node, once set up
    again, gets none of the cluster's jobs, or that many at once. They
    returned -1: the node was none of the cluster's nodes at that moment."""
    first, second = nodes.names
    with SharedJobCluster(
        where, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as alice:
        wait_until(lambda: sorted(by_name(alice)) == [first, second])
        with caplog.at_level(logging.WARNING, logger="dispynb"):
            calls = []
            for delay in [0.0, 0.002, 0.01, 0.03]:
                calls.append(alice.close_node(first))
                time.sleep(delay)
                calls.append(alice.allocate_node(first))
                time.sleep(delay)
                calls.append(alice.deallocate_node(first))
            assert calls == [0] * len(calls), caplog.text
            wait_until(lambda: first in by_name(alice))
            jobs = [alice.submit(0.05) for _ in range(8)]
            assert {job() for job in jobs} == {second}  # none on the first
            assert alice.close_node(first) == 0
            assert alice.allocate_node(first) == 0
            assert alice.set_node_cpus(first, 1) == 1, caplog.text
            assert alice.deallocate_node(second) == 0
            wait_until(lambda: first in by_name(alice))
            jobs = [alice.submit(0.2) for _ in range(3)]
            assert {job() for job in jobs} == {first}, [j.exception for j in jobs]
            assert not overlapped(jobs)  # one at a time there
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], (
            caplog.text
        )


def test_jobs_wait_for_a_node_allocated_again_as_its_close_goes_on(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
) -> None:
    """close_node, then allocate_node at once (its close under way), and jobs
    only that node may run: they run there once it is set up again. They were
    sent on the closing link and ended Terminated, "the computation is not set
    up on this node"."""
    first, second = nodes.names
    with SharedJobCluster(
        where, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as alice:
        wait_until(lambda: sorted(by_name(alice)) == [first, second])
        assert alice.close_node(first) == 0
        assert alice.allocate_node(first) == 0
        assert alice.deallocate_node(second) == 0
        jobs = [alice.submit(0.2) for _ in range(3)]
        assert {job() for job in jobs} == {first}, [j.exception for j in jobs]


def test_submit_node_to_a_node_allocated_again_runs_there_once_it_is_set_up(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
) -> None:
    """submit_node right after close_node and allocate_node (its close, or its
    setup again, under way at the scheduler): the job runs on the node once it is
    set up again, as the last call says. It ended Abandoned, "its client closed
    node ... (close_node, terminate_pending)", or submit_node returned None."""
    first, second = nodes.names
    with SharedJobCluster(
        where, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as alice:
        wait_until(lambda: sorted(by_name(alice)) == [first, second])
        for delay in [0.0, 0.003, 0.01, 0.05, 0.2]:
            assert alice.close_node(first) == 0
            time.sleep(delay)  # lands in another phase of the close or setup
            assert alice.allocate_node(first) == 0
            job = alice.submit_node(first, 0.0)
            assert job is not None
            assert job() == first, (job.status, job.exception)
            wait_until(lambda: first in by_name(alice))  # for the next turn
        assert alice.close_node(first) == 0  # the last call: one pinned now ends
        job = alice.submit_node(first, 0.0)
        assert job is None or job() is None
        assert job is None or job.exception.endswith(
            " (close_node) and the job was pinned to it (submit_node)"
        ), job.exception  # (it said "close_node, terminate_pending")
