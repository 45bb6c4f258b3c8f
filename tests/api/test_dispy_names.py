"""The names dispy programs use: module settings, ClusterStatus, cluster attributes,
print_status's totals."""

from __future__ import annotations

import inspect
import pydoc
import re
import socket
import threading
import time
from pathlib import Path

import pytest

import dispynb
import dispynb as dispy
from dispynb import DispyJob, DispyNode, JobCluster, SharedJobCluster
from dispynb.backends.base import JobEvents
from dispynb.errors import DispynbError
from tests import jobs
from tests.jobs import WAIT, wait_for_path, wait_until
from tests.nodeproc import running_node


def test_module_has_dispy_config_and_msg_timeout() -> None:
    assert dispy.MsgTimeout == 10
    from dispynb import MsgTimeout

    assert MsgTimeout == dispy.config.MsgTimeout
    config = dispy.config
    assert config.NodePort == config.DispyPort + 1 == 9711
    assert config.HTTPServerPort == 8181
    assert config.IPv4MulticastGroup == "239.255.61.59"
    assert config.MaxFileSize == 0
    for name in ("ClientPort", "SharedSchedulerPort", "IPv6MulticastGroup", "Java"):
        assert hasattr(config, name)
    assert {"config", "MsgTimeout", "ClusterStatus"} <= set(dir(dispynb))


def test_cluster_status_is_dispys_namedtuple() -> None:
    status = dispy.ClusterStatus(nodes=[], jobs_pending=3)
    assert status._fields == ("nodes", "jobs_pending")
    assert status == ([], 3)


@pytest.mark.parametrize("where", ["dispy.MsgTimeout", "dispy.config.MsgTimeout"])
def test_msg_timeout_bounds_the_connection_to_a_node(monkeypatch, where) -> None:
    """A node that accepts but never answers fails within MsgTimeout's handshake
    share (MsgTimeout / 2), not the default 5 s. ``dispy.MsgTimeout = 1`` is what
    works in dispy (its module's own name): it was set on dispynb and read by
    nothing."""
    monkeypatch.setattr(
        dispy if where == "dispy.MsgTimeout" else dispy.config, "MsgTimeout", 1.0
    )
    assert dispy.MsgTimeout == dispy.config.MsgTimeout == 1.0
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = silent.getsockname()[1]
    try:
        with pytest.raises(DispynbError, match=r"handshake in 0\.5 s"):
            JobCluster(jobs.square, nodes=[f"127.0.0.1:{port}"], secret="s3cret")
    finally:
        stop.set()
        thread.join(WAIT)
        silent.close()
        for conn in accepted:
            conn.close()


def test_cluster_attributes_as_in_dispy(local1, tmp_path: Path) -> None:
    def job_status(job: DispyJob) -> None:
        pass

    def cluster_status(status: int, node: DispyNode | None, job: DispyJob | None):
        pass

    before = time.time()
    with JobCluster(
        jobs.mark_and_hold,
        nodes=local1,
        job_status=job_status,
        pulse_interval=2,
        ping_interval=5,
        poll_interval=10,
    ) as cluster:
        assert cluster.job_status is job_status
        assert cluster.cluster_status is None
        cluster.cluster_status = cluster_status  # dispy programs assign them
        assert cluster.cluster_status is cluster_status
        with pytest.raises(DispynbError, match="cluster_status"):
            cluster.cluster_status = job_status  # one parameter: not callable so
        assert (cluster.pulse_interval, cluster.ping_interval) == (2, 5)
        assert cluster.poll_interval == 10
        assert before <= cluster.start_time <= time.time()
        assert cluster.end_time is None
        assert cluster.cpu_time == 0
        job = cluster.submit(str(tmp_path / "m"), str(tmp_path / "r"))
        wait_for_path(tmp_path / "m")
        assert cluster.end_time is None  # a job is pending
        (tmp_path / "r").touch()
        assert cluster.wait(timeout=WAIT)
        assert job.status == DispyJob.Finished
        assert cluster.end_time is not None
        assert cluster.start_time <= cluster.end_time <= time.time()
        assert cluster.cpu_time == pytest.approx(job.end_time - job.start_time)
        # dispy's name() is a method (programs call it); a string here as well.
        assert cluster.name() == "mark_and_hold" == cluster.name
        assert type(cluster.name()) is str


def test_print_status_has_dispys_pending_line_and_totals(local1, tmp_path, capsys):
    with JobCluster(jobs.mark_and_hold, nodes=local1) as cluster:
        held = [
            cluster.submit(str(tmp_path / f"m{i}"), str(tmp_path / "r"))
            for i in range(3)
        ]
        wait_for_path(tmp_path / "m0")
        cluster.print_status()
        pending = capsys.readouterr().out
        (tmp_path / "r").touch()
        assert cluster.wait(timeout=WAIT)
        wait_until(lambda: all(job.done() for job in held))
        cluster.print_status(wall_time=2.0)
        done = capsys.readouterr().out
    assert "Jobs pending: 3" in pending.splitlines()
    lines = done.splitlines()
    assert lines[0] == "" and lines[-1] == ""  # dispy prints blank lines around it
    assert re.fullmatch(r"\s*Node \| *CPUs \| *Jobs \| *Sec/Job \|.*Rcvd", lines[1])
    assert not any(line.startswith("Jobs pending") for line in lines)
    row = next(line for line in lines if "local-0" in line)
    assert re.search(r"\|\s+1 \|\s+3 \|", row)  # 1 CPU, 3 jobs
    total = next(line for line in lines if line.startswith("Total job time"))
    assert re.fullmatch(
        r"Total job time: \d+\.\d{3} sec, wall time: 2\.000 sec, speedup: \d+\.\d{3}",
        total,
    )


def test_a_job_cancelled_while_running_counts_its_run_time(local1, tmp_path) -> None:
    """dispy adds a Terminated job's run time to its node's ``cpu_time`` (and
    print_status's Node Time and Total job time), as a Finished one's."""
    with JobCluster(jobs.mark_and_hold, nodes=local1) as cluster:
        job = cluster.submit(str(tmp_path / "m"), str(tmp_path / "never"))
        wait_for_path(tmp_path / "m")
        wait_until(lambda: job.status == DispyJob.Running)
        assert cluster.cancel(job) == 0
        assert job.wait(timeout=WAIT) and job.status == DispyJob.Terminated
        ran = job.end_time - job.start_time
        assert ran > 0
        (node,) = cluster.status().nodes
        assert node.jobs_done == 1
        assert node.cpu_time == pytest.approx(ran)
        assert cluster.cpu_time == pytest.approx(ran)


def node_name() -> str:
    return dispy_node_name  # type: ignore[name-defined]  # noqa: F821


@pytest.mark.slow
def test_dispy_port_set_in_dispy_config_names_the_port_of_the_nodes(
    monkeypatch, tmp_path: Path
) -> None:
    """dispy's ``dispy_port=P`` only set ``dispy.config.DispyPort = P``: a program that
    sets it itself names the port of nodes given without one, as ``dispy_port=P``
    does (a node started with ``-p P``); before, it was ignored (port 9711)."""
    with running_node(tmp_path / "node", name="on-p") as node:
        monkeypatch.setattr(dispy.config, "DispyPort", node.port)
        with JobCluster(node_name, nodes=["127.0.0.1"], secret=node.secret) as cluster:
            assert cluster.submit()() == "on-p"
    monkeypatch.setattr(dispy.config, "DispyPort", "9700")
    with pytest.raises(DispynbError, match=r"dispy\.config\.DispyPort must be a TCP"):
        JobCluster(node_name, nodes=["127.0.0.1"])


@pytest.mark.parametrize("cls", [JobCluster, SharedJobCluster])
def test_help_of_a_cluster_shows_its_api_not_the_engines_events(cls) -> None:
    """``help(dispy.JobCluster)`` lists dispy's methods and dispynb's documented
    additions, each with its docstring; the events an engine reports to the
    cluster (`JobEvents`) are no methods of it. They were listed (node_ready,
    job_done, batch...), undocumented, for a program to call."""
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    events = [name for name in vars(JobEvents) if not name.startswith("_")]
    assert "job_done" in events and "batch" in events
    for name in events:
        assert not hasattr(cls, name), name
        assert f"{name}(self" not in text, name
    for name in dir(cls):
        if not name.startswith("_"):
            assert inspect.getdoc(getattr(cls, name)), f"{cls.__name__}.{name}"
