"""``JobCluster(..., engine=...)``: the façade on an engine other than node servers.

`tests.engines.ThreadEngine` runs jobs on threads of this process, written only
against `dispynb.backends.base`. These tests prove the façade needs nothing else
from an engine, that a feature an engine does not declare is refused with
`NotSupportedError` before anything runs, and that `Executor` passes the engine
through its cluster factory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from dispynb import DispyJob, DispyNode, Executor, JobCluster
from dispynb.backends.nodes import NodeEngine
from dispynb.cluster import new_cluster
from dispynb.errors import (
    ConfigurationError,
    NotSupportedError,
    SerializationError,
)
from tests import jobs
from tests.engines import ThreadEngine


@pytest.fixture
def engine() -> Iterator[ThreadEngine]:
    yield ThreadEngine()


def add(x: int, y: int = 0) -> int:
    return x + y


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


def test_jobs_run_on_another_engine_with_dispy_api(engine):
    events: list[tuple[int, str | None]] = []
    done: list[DispyJob] = []

    def cluster_status(status: int, node: DispyNode | None, job: Any) -> None:
        events.append((int(status), node.name if node is not None else None))

    with JobCluster(
        add,
        engine=engine,
        cluster_status=cluster_status,
        job_status=done.append,
    ) as cluster:
        assert cluster.engine is engine
        submitted = [cluster.submit(i, y=10) for i in range(6)]
        third = cluster.submit(3)
        pinned = cluster.submit_node("threads", 1)  # by the node's name
        assert pinned is not None
        assert cluster.wait(timeout=jobs.WAIT)
        assert [job.result for job in submitted] == [10, 11, 12, 13, 14, 15]
        assert {job.status for job in submitted} == {DispyJob.Finished}
        assert all(job.ip_addr == "127.0.0.1" for job in submitted)
        assert (third.result, pinned.result) == (3, 1)
        (node,) = cluster.status().nodes
        assert (node.name, node.cpus, node.jobs_done) == ("threads", 2, 8)
        assert node.platform == "python"
    assert (int(DispyNode.Initialized), "threads") == events[0]
    assert sum(1 for e in events if e[0] == DispyJob.Finished) == 8
    assert len(done) == 8
    assert cluster.job_counts["Finished"] == 8


def test_remote_failure_keeps_its_traceback(engine):
    with JobCluster(fail, engine=engine) as cluster:
        job = cluster.submit(7)
        assert job.wait(timeout=jobs.WAIT)
    assert job.status == DispyJob.Terminated
    assert "ValueError: bad 7" in job.exception


def test_unpicklable_argument_is_refused_before_the_job_exists(engine):
    seen: list[int] = []
    with JobCluster(add, engine=engine) as cluster:
        cluster.add_listener(lambda status, node, job: seen.append(int(status)))
        with pytest.raises(SerializationError):
            cluster.submit(threading.Lock())
        assert cluster.status().jobs_pending == 0
        assert cluster.job_counts["submitted"] == 0
    assert DispyJob.Created not in seen


def test_cancel_of_a_queued_job_reaches_the_engine(engine):
    gate = threading.Event()

    def hold(x: int) -> int:
        gate.wait(jobs.WAIT)
        return x

    with JobCluster(hold, engine=engine) as cluster:
        running = [cluster.submit(i) for i in range(2)]  # both threads busy
        queued = cluster.submit(2)
        assert cluster.cancel(queued) == 0
        assert queued.wait(timeout=jobs.WAIT)
        gate.set()
        assert cluster.wait(timeout=jobs.WAIT)
    assert queued.status == DispyJob.Cancelled
    assert [job.result for job in running] == [0, 1]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"setup": add}, "setup="),
        ({"cleanup": add}, "cleanup="),
        ({"job_timeout": 5}, "job_timeout="),
        ({"mem_limit": "1G"}, "mem_limit="),
        ({"recover_file": "r.db"}, "recover_file="),
    ],
)
def test_options_the_engine_lacks_are_refused_before_it_opens(
    engine, options, named, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotSupportedError, match=named) as raised:
        JobCluster(add, engine=engine, **options)
    assert "'threads' engine" in str(raised.value)
    assert engine.opened == []
    assert not (tmp_path / "r.db").exists()


def test_program_computation_is_refused_on_an_engine_without_programs(engine):
    with pytest.raises(NotSupportedError, match="program"):
        JobCluster("/bin/echo", engine=engine)


def test_methods_the_engine_lacks_raise_one_clear_error(engine, tmp_path):
    with JobCluster(add, engine=engine) as cluster:
        node = cluster.status().nodes[0]
        calls = {
            "allocate_node": lambda: cluster.allocate_node("127.0.0.1"),
            "deallocate_node": lambda: cluster.deallocate_node(node),
            "set_node_cpus": lambda: cluster.set_node_cpus(node, 1),
            "close_node": lambda: cluster.close_node(node),
            "resetup_node": lambda: cluster.resetup_node(node),
            "node_jobs": lambda: cluster.node_jobs(node),
            "send_file": lambda: cluster.send_file(__file__, node),
            "dispy_job_depends": lambda: cluster.submit(1, dispy_job_depends=[add]),
            "dispy_job_timeout": lambda: cluster.submit(1, dispy_job_timeout=3),
            "dispy_job_mem_limit": lambda: cluster.submit(1, dispy_job_mem_limit=1e9),
        }
        for what, call in calls.items():
            with pytest.raises(NotSupportedError, match=f"{what} is not supported"):
                call()
        assert cluster.status().jobs_pending == 0


def test_something_else_than_an_engine_is_refused():
    with pytest.raises(ConfigurationError, match="is not an engine"):
        JobCluster(add, engine="dask")


def test_explicit_node_engine_is_the_default(local):
    with JobCluster(add, nodes=local, engine=NodeEngine()) as cluster:
        assert cluster.engine.name == "nodes"
        assert cluster.submit(2, y=3)() == 5


def test_executor_runs_calls_on_the_engine_through_its_factory(engine):
    made: list[dict[str, Any]] = []

    def factory(computation: Any, /, **kwargs: Any) -> JobCluster:
        made.append(kwargs)
        return new_cluster(computation, **kwargs)

    with Executor(engine=engine, cluster_factory=factory) as executor:
        assert list(executor.map(pow, [2, 3], [5, 2])) == [32, 9]
        assert executor.cpus == 2
    assert made[0]["engine"] is engine and made[0]["nodes"] is None
    assert len(engine.opened) == 1  # no LocalCluster: the engine's workers ran them


def test_executor_initializer_needs_an_engine_with_setup(engine):
    with pytest.raises(NotSupportedError, match="setup="):
        Executor(engine=engine, initializer=print)
