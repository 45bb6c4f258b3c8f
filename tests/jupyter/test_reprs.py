"""Rich displays of the engine's own objects (JobCluster, DispyJob) in notebooks."""

from __future__ import annotations

import socket

import pytest

from dispynb import JobCluster, LocalCluster
from tests.jobs import wait_until
from tests.nodeproc import start_node


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


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_node_on_ipv6_shows_its_address_in_brackets(tmp_path):
    """Before: the cluster's table read "::1:PORT" (the job's already "[::1]:PORT")."""
    node = start_node(tmp_path / "node", "--host", "::1")
    try:
        address = f"[::1]:{node.port}"
        with JobCluster(abs, nodes=[address], secret=node.secret) as cluster:
            job = cluster.submit(-3)
            assert job() == 3
            shown = cluster._repr_html_(), job._repr_html_()
    finally:
        node.stop()
    assert all(address in html for html in shown), shown
    assert f"::1:{node.port}" not in shown[0].replace(address, "")


def _nap(x):
    import time

    time.sleep(0.5)
    return x


@pytest.mark.slow
def test_a_runs_html_names_each_node_it_ran_on():
    """A run on two local nodes: its summary named them "nodes: 127.0.0.1", one
    address for two nodes, where its cell, the panel and run.df name each."""
    from dispynb.jupyter.run import Run

    with LocalCluster(nodes=2, cpus=1) as local:
        run = Run.map(_nap, range(4), nodes=local, progress="none")
        ports = sorted(int(spec.rsplit(":", 1)[1]) for spec in local.node_specs())
        shown = run._repr_html_()
    names = set(run.df.node_name)
    assert names == {"local-0", "local-1"}, run.df
    line = shown.split("nodes: ", 1)[1].split("</div>", 1)[0]
    for name in names:
        node = run.df[run.df.node_name == name].node.iloc[0]
        assert f"{name} ({node})" in line, line
    assert sorted(int(n.rsplit(":", 1)[1]) for n in run.df.node.unique()) == ports
