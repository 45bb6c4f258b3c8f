"""dispy's ``cluster.cancel(job)`` as scripts see it, with real nodes on 127.0.0.1.

dispy marks a job ``Cancelled`` the moment it is cancelled; a running one then ends
as its node reports (``Terminated``, or ``Finished`` if it caught the interrupt and
returned). A second cancel of it returns -1, and no callback reports the cancel
itself, only the job's end.
"""

from __future__ import annotations

import copy
import threading

import pytest

from dispynb import DispyJob, JobCluster
from tests import jobs
from tests.jobs import WAIT, wait_for_path

pytestmark = pytest.mark.slow


def test_cancel_of_a_running_job_marks_it_cancelled_at_once_and_once(local1, tmp_path):
    marker, release = tmp_path / "started", tmp_path / "release"
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        with lock:
            seen.append(("job", job.status))

    def cluster_status(status: int, node: object, job: DispyJob | None) -> None:
        if job is not None:
            with lock:
                seen.append(("cluster", status))

    with JobCluster(
        jobs.hold_through_interrupt,
        nodes=local1,
        job_status=job_status,
        cluster_status=cluster_status,
    ) as cluster:
        job = cluster.submit(str(marker), str(release))
        wait_for_path(marker)
        jobs.wait_until(lambda: job.status == DispyJob.Running)
        # The job ignores the interrupt: the node kills it only after its grace
        # period, and until then it is still running there.
        assert cluster.cancel(job) == 0
        assert job.status == DispyJob.Cancelled
        assert not job.done()
        assert cluster.cancel(job) == -1
        assert job.status == DispyJob.Cancelled
        assert job.wait(timeout=WAIT)
        assert job.status == DispyJob.Terminated
        assert cluster.cancel(job) == -1
        assert cluster.wait(timeout=WAIT)
    # No callback for the cancel itself: Created, Running, then the end.
    assert seen == [
        ("cluster", DispyJob.Created),
        ("cluster", DispyJob.Running),
        ("job", DispyJob.Terminated),
        ("cluster", DispyJob.Terminated),
    ], seen


def test_cancel_of_a_queued_job_marks_it_cancelled_at_once_and_once(local1, tmp_path):
    marker, release = tmp_path / "started", tmp_path / "release"
    with JobCluster(jobs.mark_and_hold, nodes=local1) as cluster:
        try:
            running = cluster.submit(str(marker), str(release))
            wait_for_path(marker)
            queued = cluster.submit(str(tmp_path / "never"), str(release))
            # As a callback would, with the copy of the job it was given.
            assert cluster.cancel(copy.copy(queued)) == 0
            assert queued.status == DispyJob.Cancelled
            assert cluster.cancel(queued) == -1
            assert queued.wait(timeout=WAIT)
            assert queued.status == DispyJob.Cancelled
            assert not (tmp_path / "never").exists()
            release.touch()
            assert running.wait(timeout=WAIT)
            assert running.status == DispyJob.Finished
        finally:
            release.touch()


def test_a_cancelled_job_that_never_started_names_no_node(local1, tmp_path):
    """dispy's cancel of a queued job tells ``cluster_status`` (Cancelled, None,
    job) and the job has no ``ip_addr``: it never reached a node. dispynb sends a
    job ahead to a busy node; cancelled there before it started, it used to name
    that node (and count on it)."""
    marker, release = tmp_path / "started", tmp_path / "release"
    told: list[tuple[int, object, object]] = []
    lock = threading.Lock()

    def cluster_status(status: int, node: object, job: DispyJob | None) -> None:
        if job is not None and status == DispyJob.Cancelled:
            with lock:
                told.append((status, node, job.ip_addr))

    with JobCluster(
        jobs.mark_and_hold, nodes=local1, cluster_status=cluster_status
    ) as cluster:
        try:
            running = cluster.submit(str(marker), str(release))
            wait_for_path(marker)
            queued = cluster.submit(str(tmp_path / "never"), str(release))
            # Wait until the node holds it (sent ahead), not just the client.
            jobs.wait_until(lambda: queued.ip_addr is not None)
            assert cluster.cancel(queued) == 0
            assert queued.wait(timeout=WAIT)
            assert queued.status == DispyJob.Cancelled
            assert queued.ip_addr is None
            release.touch()
            assert running.wait(timeout=WAIT)
            assert cluster.wait(timeout=WAIT)
            node = cluster.status().nodes[0]
            assert node.jobs_done == 1  # the one that ran
        finally:
            release.touch()
    assert told == [(DispyJob.Cancelled, None, None)]


def test_terminating_a_cluster_drops_its_queued_jobs_in_one_go(local1, tmp_path):
    """``close(terminate=True)`` with 300 jobs queued behind a running one: each
    queued job still ends once, ``Cancelled``, and ``job_status`` and
    ``cluster_status`` each get a copy of it (no node), as dispy's; the running
    one is stopped by its node (``Terminated``). The ends reach the callback
    thread in a few posts, not two or three per job (a notebook's Stop of
    200,000 jobs spent seconds on them)."""
    marker, release = tmp_path / "started", tmp_path / "release"
    told: list[tuple[str, int, object, DispyJob]] = []
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        with lock:
            told.append(("job", job.status, None, job))

    def cluster_status(status: int, node: object, job: DispyJob | None) -> None:
        if job is not None and status != DispyJob.Created:
            with lock:
                told.append(("cluster", status, node, job))

    cluster = JobCluster(
        jobs.mark_and_hold,
        nodes=local1,
        job_status=job_status,
        cluster_status=cluster_status,
    )
    try:
        running = cluster.submit(str(marker), str(release))
        wait_for_path(marker)
        queued = [
            cluster.submit(str(tmp_path / "never"), str(release)) for _ in range(300)
        ]
        assert cluster._callbacks.flush(WAIT)
        posts: list[object] = []
        post = cluster._callbacks.post

        def counted(fn: object, *args: object) -> None:
            posts.append(fn)
            post(fn, *args)  # type: ignore[arg-type]

        cluster._callbacks.post = counted  # type: ignore[method-assign]
        assert cluster.close(terminate=True)
    finally:
        release.touch()
    assert running.status == DispyJob.Terminated
    assert [job.status for job in queued] == [DispyJob.Cancelled] * 300
    assert not (tmp_path / "never").exists()
    ends = [(kind, status, node, job.id) for kind, status, node, job in told]
    for job in queued:
        assert ends.count(("job", DispyJob.Cancelled, None, job.id)) == 1
        assert ends.count(("cluster", DispyJob.Cancelled, None, job.id)) == 1
    assert not {id(job) for *_, job in told} & {id(job) for job in queued}  # copies
    assert len(posts) < 20, len(posts)
