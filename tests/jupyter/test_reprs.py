"""Rich displays of the engine's own objects (JobCluster, DispyJob) in notebooks."""

from __future__ import annotations

import pytest

from dispynb import JobCluster, LocalCluster


@pytest.mark.slow
def test_cluster_and_job_render_as_html():
    with LocalCluster(cpus=1) as local, JobCluster(abs, nodes=local) as cluster:
        job = cluster.submit(-7)
        assert job() == 7
        job_html = job._repr_html_()
        cluster_html = cluster._repr_html_()
    assert "<table" in job_html and "Finished" in job_html
    assert "<table" in cluster_html and "local-0" in cluster_html
