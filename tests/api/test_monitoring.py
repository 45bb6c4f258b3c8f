"""ClusterMonitor and the cluster's listener hook, on real local nodes."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from dispynb import JobCluster, LocalCluster
from dispynb.job import DispyJob, JobStatus
from dispynb.monitoring import ClusterMonitor, live_clusters
from tests.jobs import WAIT, mark_and_sleep, square, wait_for_path, wait_until


def test_snapshot_counts_nodes_and_jobs(local: LocalCluster) -> None:
    with JobCluster(square, nodes=local) as cluster:
        monitor = ClusterMonitor(cluster)
        jobs = [cluster.submit(i) for i in range(6)]
        assert [job() for job in jobs] == [i * i for i in range(6)]
        cluster.wait()
        snap = monitor.snapshot()
        json.dumps(snap)  # JSON-ready as promised
        assert snap["id"] == cluster.uid and snap["name"] == "square"
        assert snap["counts"]["total"] == 6
        assert snap["counts"]["finished"] == 6
        assert snap["counts"]["pending"] == snap["counts"]["running"] == 0
        [node] = snap["nodes"]
        assert node["cpus"] == 2 and node["jobs_done"] == 6
        assert node["id"] == f"{node['ip_addr']}:{node['port']}"
        assert [job["status"] for job in snap["jobs"]] == ["Finished"] * 6
        # most recently finished first: the last job to finish leads
        assert sorted(job["key"] for job in snap["jobs"]) == [j._key for j in jobs]
        assert all(job["node"] == node["id"] for job in snap["jobs"])
        assert all(job["end_time"] >= job["start_time"] for job in snap["jobs"])
        assert all(job["args"] is None for job in snap["jobs"])
        shown = monitor.snapshot(show_args=True, max_jobs=2)
        keys = [job["key"] for job in snap["jobs"][:2]]
        assert [job["key"] for job in shown["jobs"]] == keys
        assert [job["args"] for job in shown["jobs"]] == [str(k - 1) for k in keys]
        monitor.close()


def test_running_jobs_come_first_and_cancel_by_key(
    local1: LocalCluster, tmp_path: Path
) -> None:
    marker = str(tmp_path / "started")
    with JobCluster(mark_and_sleep, nodes=local1) as cluster:
        monitor = ClusterMonitor(cluster)
        running = cluster.submit(marker, 30)
        queued = cluster.submit(None, 30)
        wait_for_path(marker)
        # The monitor hears of the start (and where) just after the status changes.
        wait_until(lambda: any(job["node"] for job in monitor.snapshot()["jobs"]))
        snap = monitor.snapshot()
        # the second job may be sent ahead to the busy node (then it is Running too)
        assert snap["counts"]["running"] + snap["counts"]["pending"] == 2
        assert snap["counts"]["running"] >= 1
        assert [job["key"] for job in snap["jobs"]] == [running._key, queued._key]
        assert snap["jobs"][0]["status"] == "Running"
        assert snap["jobs"][0]["node"] == snap["nodes"][0]["id"]
        assert monitor.cancel(queued._key) is True
        assert queued.wait(WAIT) and queued.status == JobStatus.Cancelled  # never ran
        assert monitor.cancel(queued._key) is False  # already done
        assert monitor.cancel(12345) is False  # no such job
        assert monitor.cancel_all() == 1
        assert running.wait(WAIT) and running.status == JobStatus.Terminated
        assert cluster.wait(WAIT)  # counted: a job's waiters wake before that
        counts = monitor.snapshot()["counts"]
        assert (counts["cancelled"], counts["terminated"]) == (1, 1)


def test_cancel_all_sends_one_request(local: LocalCluster, tmp_path: Path) -> None:
    """Cancel all (the web monitor's and the lab panel's button) cancels in one
    request: one by one, a queued job could start on a worker freed by an earlier
    cancel and end Terminated instead of Cancelled."""
    marker = str(tmp_path / "started")
    with JobCluster(mark_and_sleep, nodes=local) as cluster:
        monitor = ClusterMonitor(cluster)
        jobs = [cluster.submit(marker, 30)] + [
            cluster.submit(None, 30) for _ in range(5)
        ]
        wait_for_path(marker)
        backend = cluster._backend
        assert backend is not None
        requests: list[list[int]] = []
        cancel = backend.cancel

        def recorded(keys: list[int], *args: object, **kwargs: object) -> None:
            requests.append(list(keys))
            cancel(keys, *args, **kwargs)  # type: ignore[arg-type]

        backend.cancel = recorded  # type: ignore[method-assign]
        assert monitor.cancel_all() == 6
        assert requests == [[job._key for job in jobs]]
        assert all(job.finish.wait(WAIT) for job in jobs)
        monitor.close()


def test_wait_change_wakes_on_events(local: LocalCluster) -> None:
    with JobCluster(square, nodes=local) as cluster:
        monitor = ClusterMonitor(cluster)
        version = monitor.version
        woke: list[int] = []
        waiter = threading.Thread(
            target=lambda: woke.append(monitor.wait_change(version, WAIT))
        )
        waiter.start()
        cluster.submit(3)()
        waiter.join(WAIT)
        assert woke and woke[0] != version
        # nothing happens: the wait times out with the same version
        cluster.wait()
        settled = monitor.version
        assert monitor.wait_change(settled, 0.05) == settled


def test_set_node_cpus_and_live_clusters(local: LocalCluster) -> None:
    with JobCluster(square, nodes=local) as cluster:
        assert cluster in live_clusters()
        monitor = ClusterMonitor(cluster)
        [node] = monitor.snapshot()["nodes"]
        assert monitor.set_node_cpus(node["id"], 1) == 1
        assert monitor.snapshot()["nodes"][0]["cpus"] == 1
        assert monitor.set_node_cpus("10.9.9.9:1", 1) == -1
        assert cluster.submit(4)() == 16
    assert cluster not in live_clusters()


def test_a_failing_listener_is_logged_not_fatal(
    local: LocalCluster, allow_error_logs: list[logging.LogRecord]
) -> None:
    def broken(status: int, node: object, job: object) -> None:
        raise RuntimeError("listener bug")

    with JobCluster(square, nodes=local) as cluster:
        cluster.add_listener(broken)
        assert cluster.submit(5)() == 25
        cluster.remove_listener(broken)
    assert any(
        "listener" in r.getMessage()
        and r.exc_info
        and "listener bug" in str(r.exc_info[1])
        for r in allow_error_logs
    )


def test_counts_without_a_job_list_look_at_no_job(
    local1: LocalCluster, tmp_path: Path, monkeypatch
) -> None:
    """The lab panel's snapshot (``max_jobs=0``, 4 a second) looked at every
    unfinished job to count them (200,000 queued: a CPU-heavy push thread); the
    monitor keeps the counts as the events come."""
    marker = str(tmp_path / "started")
    with JobCluster(mark_and_sleep, nodes=local1) as cluster:
        monitor = ClusterMonitor(cluster)
        cluster.submit(marker, 30)
        for _ in range(20):
            cluster.submit(None, 30)
        wait_for_path(marker)
        wait_until(lambda: monitor.snapshot(max_jobs=0)["counts"]["running"] >= 1)
        looked = []
        here = threading.get_ident()
        done = DispyJob.done

        def counted_done(job: DispyJob) -> bool:
            if threading.get_ident() == here:
                looked.append(job)
            return done(job)

        monkeypatch.setattr(DispyJob, "done", counted_done)
        counts = monitor.snapshot(max_jobs=0)["counts"]
        monkeypatch.undo()
        assert looked == []
        assert counts["running"] + counts["pending"] == 21, counts
        assert monitor.cancel_all() == 21
        assert cluster.wait(WAIT)
        counts = monitor.snapshot(max_jobs=0)["counts"]
        assert (counts["running"], counts["pending"]) == (0, 0), counts
        assert counts["cancelled"] + counts["terminated"] == 21, counts


def test_a_job_list_looks_at_the_running_and_first_queued_jobs(
    local1: LocalCluster, tmp_path: Path, monkeypatch
) -> None:
    """The web monitor's snapshot (``max_jobs``, at each poll) filtered and sorted
    every unfinished job (200,000 queued: much CPU per poll); it looks at the
    running ones and the first queued, and lists the same jobs in the same order."""
    marker = str(tmp_path / "started")
    with JobCluster(mark_and_sleep, nodes=local1) as cluster:
        monitor = ClusterMonitor(cluster)
        jobs = [cluster.submit(marker, 30)]
        jobs += [cluster.submit(None, 30) for _ in range(60)]
        wait_for_path(marker)
        wait_until(lambda: monitor.snapshot(max_jobs=0)["counts"]["running"] >= 1)
        unfinished = [job for job in jobs if not job.done()]
        unfinished.sort(key=lambda job: (job.status != JobStatus.Running, job._seq))
        looked = set()
        here = threading.get_ident()
        done = DispyJob.done

        def counted_done(job: DispyJob) -> bool:
            if threading.get_ident() == here:
                looked.add(job._key)
            return done(job)

        monkeypatch.setattr(DispyJob, "done", counted_done)
        shown = monitor.snapshot(max_jobs=5)["jobs"]
        monkeypatch.undo()
        assert [job["key"] for job in shown] == [job._key for job in unfinished[:5]]
        assert shown[0]["status"] == "Running"
        # the running job(s) and the first queued, not the 60 (the node may have
        # one sent ahead)
        assert len(looked) <= 8, sorted(looked)
        assert monitor.cancel_all() == 61
        assert cluster.wait(WAIT)


def test_a_monitor_attached_while_a_thread_submits_lists_the_first_queued(
    local1: LocalCluster, tmp_path: Path, monkeypatch
) -> None:
    """The web monitor or the lab panel attaching to a cluster while another
    thread submits to it (a cell's loop): the jobs that thread submitted as the
    monitor copied the earlier ones came first among its queued jobs, and its
    job list showed those later jobs as the next to run. Here the thread submits
    between the monitor's listening and its copy, as a thread switch there does."""
    marker = str(tmp_path / "started")
    with JobCluster(mark_and_sleep, nodes=local1) as cluster:
        jobs = [cluster.submit(marker, 30)]
        jobs += [cluster.submit(None, 30) for _ in range(20)]
        wait_for_path(marker)
        listen = cluster.add_listener

        def listen_then_submit(listener: object) -> None:
            listen(listener)  # type: ignore[arg-type]
            submitter = threading.Thread(
                target=lambda: jobs.extend(cluster.submit(None, 30) for _ in range(10))
            )
            submitter.start()
            submitter.join(WAIT)
            assert not submitter.is_alive()

        monkeypatch.setattr(cluster, "add_listener", listen_then_submit)
        monitor = ClusterMonitor(cluster)
        monkeypatch.undo()
        assert len(jobs) == 31
        wait_until(lambda: monitor.snapshot(max_jobs=0)["counts"]["running"] >= 1)
        counts = monitor.snapshot(max_jobs=0)["counts"]
        assert counts["running"] + counts["pending"] == 31, counts
        unfinished = [job for job in jobs if not job.done()]
        unfinished.sort(key=lambda job: (job.status != JobStatus.Running, job._seq))
        shown = monitor.snapshot(max_jobs=5)["jobs"]
        assert [job["key"] for job in shown] == [job._key for job in unfinished[:5]]
        assert monitor.cancel_all() == 31
        assert cluster.wait(WAIT)
        monitor.close()


def test_an_event_heard_after_its_jobs_end_records_the_end_once(
    local1: LocalCluster,
) -> None:
    """A job's Running heard after its Finished (events come from several
    threads; those held while a monitor attaches are applied late): the job
    ended once in the monitor's history and its counts (before: two rows, and a
    cancelled job counted twice as stopped)."""
    with JobCluster(square, nodes=local1) as cluster:
        monitor = ClusterMonitor(cluster)
        job = cluster.submit(3)
        assert job() == 9
        wait_until(lambda: len(monitor.snapshot()["jobs"]) == 1)
        listener = monitor._on_event  # as the cluster calls it, late
        listener(int(JobStatus.Running), None, job)
        snapshot = monitor.snapshot()
        assert [row["key"] for row in snapshot["jobs"]] == [job._key]
        assert snapshot["counts"]["running"] == snapshot["counts"]["pending"] == 0
        assert snapshot["counts"]["finished"] == 1
        monitor.close()


def test_jobs_close_terminate_ends_are_stopped_not_failed(
    local1: LocalCluster, tmp_path: Path
) -> None:
    """``close(terminate=True)`` (and a Stop inside ``with JobCluster(...)``, whose
    exit calls it) ends the running jobs as asked: the monitor counts them stopped
    by the user, as a Cancel's (before: failed, in the lab panel's card)."""
    marker = str(tmp_path / "started")
    cluster = JobCluster(mark_and_sleep, nodes=local1)
    monitor = ClusterMonitor(cluster)
    job = cluster.submit(marker, 30)
    wait_for_path(marker)
    cluster.close(terminate=True)
    assert job.status is JobStatus.Terminated
    assert monitor.stopped == 1
    monitor.close()
