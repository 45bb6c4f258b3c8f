"""Start-up of a computation on nodes: failing setup, slow setup, all nodes gone."""

from __future__ import annotations

import os

import pytest

import dispynb.backends.nodes
from dispynb import DispyJob, JobCluster
from dispynb.errors import SetupError
from tests import jobs

pytestmark = pytest.mark.slow


def test_jobcluster_setup_raises_on_only_node_raises_setup_error(local):
    def setup() -> None:
        raise RuntimeError("no data here")

    with pytest.raises(SetupError) as info:
        JobCluster(jobs.square, nodes=local, setup=setup)
    assert "setup raised RuntimeError: no data here" in str(info.value)
    assert "RuntimeError: no data here" in info.value.remote_traceback


def test_jobcluster_setup_bad_return_code_raises_setup_error(local):
    def setup() -> int:
        return 7

    with pytest.raises(SetupError, match="setup returned 7"):
        JobCluster(jobs.square, nodes=local, setup=setup)


def test_jobcluster_slow_setup_constructor_returns_and_jobs_wait(
    local, tmp_path, monkeypatch
):
    """A setup longer than the start-up wait keeps running; jobs run after it."""
    monkeypatch.setattr(dispynb.backends.nodes, "STARTUP_WAIT", 0.2)
    gate = tmp_path / "gate"

    def setup() -> None:
        jobs.wait_for_path(gate, timeout=30)

    with JobCluster(jobs.square, nodes=local, setup=setup) as cluster:
        job = cluster.submit(6)
        assert not job.wait(timeout=0.3)  # setup still holds the node
        gate.write_text("go")
        assert job.wait(timeout=jobs.WAIT)
        assert job.status == DispyJob.Finished
        assert job.result == 36


def test_jobcluster_slow_setup_that_fails_abandons_waiting_jobs_with_reason(
    local, tmp_path, monkeypatch
):
    monkeypatch.setattr(dispynb.backends.nodes, "STARTUP_WAIT", 0.2)
    gate = tmp_path / "gate"

    def setup() -> None:
        jobs.wait_for_path(gate, timeout=30)
        raise ValueError("bad input file")

    with JobCluster(jobs.square, nodes=local, setup=setup) as cluster:
        job = cluster.submit(6)
        gate.write_text("go")
        assert job.wait(timeout=jobs.WAIT)
        assert job.status == DispyJob.Abandoned
        assert "no node is available" in job.exception
        assert "bad input file" in job.exception


def test_setup_shared_value_is_shared_by_all_workers(local):
    """dispy's node_shvars example: a multiprocessing.Value made in setup."""

    def setup() -> int:
        global counter
        import multiprocessing

        counter = multiprocessing.Value("i", 0)
        return 0

    def bump(_: int) -> int:
        with counter.get_lock():  # type: ignore[name-defined]
            counter.value += 1  # type: ignore[name-defined]
            return counter.value  # type: ignore[name-defined]

    with JobCluster(bump, nodes=local, setup=setup) as cluster:
        results = [cluster.submit(i) for i in range(20)]
        assert cluster.wait(timeout=jobs.WAIT)
    assert sorted(job.result for job in results) == list(range(1, 21))


def test_cleanup_false_keeps_files_and_true_removes_them(local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept.txt").write_text("data")

    def where(_: int) -> str:
        return dispy_job_path  # type: ignore[name-defined]  # noqa: F821

    paths = {}
    for cleanup in (False, True):
        with JobCluster(where, nodes=local, depends=["kept.txt"], cleanup=cleanup) as c:
            paths[cleanup] = c.submit(0)()
    assert os.path.exists(os.path.join(paths[False], "kept.txt"))
    assert not os.path.exists(paths[True])
