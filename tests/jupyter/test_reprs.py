"""Rich displays of the engine's own objects (JobCluster, DispyJob) in notebooks."""

from __future__ import annotations

import pytest

from dispynb import JobCluster, LocalCluster
from tests.jobs import wait_until


@pytest.mark.slow
def test_cluster_and_job_render_as_html():
    with LocalCluster(cpus=1) as local, JobCluster(abs, nodes=local) as cluster:
        job = cluster.submit(-7)
        assert job() == 7
        job_html = job._repr_html_()
        cluster_html = cluster._repr_html_()
    assert "<table" in job_html and "Finished" in job_html
    assert "<table" in cluster_html and "local-0" in cluster_html


@pytest.mark.slow
def test_a_jobs_html_names_its_node_apart_from_the_others_of_its_address():
    """Before: "127.0.0.1" for every job of a LocalCluster's nodes."""
    with LocalCluster(nodes=2, cpus=2) as local, JobCluster(abs, nodes=local) as c:
        wait_until(lambda: len(c.status().nodes) == 2)
        nodes = sorted(c.status().nodes, key=lambda n: n.name)
        jobs = [c.submit_node(node, -1) for node in nodes]
        assert [job() for job in jobs] == [1, 1]
        shown = [job._repr_html_() for job in jobs]
    for node, html in zip(nodes, shown, strict=True):
        assert f"{node.name} (127.0.0.1:{node.port})" in html, html
    assert nodes[0].port != nodes[1].port
