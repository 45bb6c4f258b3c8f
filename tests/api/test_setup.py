"""Start-up of a computation on nodes: failing setup, slow setup, all nodes gone."""

from __future__ import annotations

import pytest

import dispynb.cluster
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
    monkeypatch.setattr(dispynb.cluster, "STARTUP_WAIT", 0.2)
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
    monkeypatch.setattr(dispynb.cluster, "STARTUP_WAIT", 0.2)
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
