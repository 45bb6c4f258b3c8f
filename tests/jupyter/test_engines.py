"""The Jupyter layer asks for a cluster, never for an engine: `Run.map` and the
magics pass an `Engine` through a cluster factory (`tests.engines.ThreadEngine`
stands for the Dask and Ray engines: no node server runs here)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from dispynb.cluster import JobCluster, new_cluster
from dispynb.errors import NotSupportedError
from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.magics import DispyMagics, Session
from dispynb.jupyter.run import Run
from tests.engines import ThreadEngine
from tests.jupyter.shell import dispynb_shell


def triple(x: int) -> int:
    return 3 * x


def test_run_map_runs_on_the_engine_it_is_given() -> None:
    engine = ThreadEngine()
    run = Run.map(triple, range(5), engine=engine, progress="none")
    assert run.results == [0, 3, 6, 9, 12]
    assert run.counts().finished == 5
    assert len(engine.opened) == 1
    assert run.cluster is not None and run.cluster.engine is engine


def test_run_map_makes_its_cluster_with_the_factory_given() -> None:
    made: list[dict[str, Any]] = []

    def factory(computation: Any, /, **kwargs: Any) -> JobCluster:
        made.append(kwargs)
        return new_cluster(computation, **kwargs)

    engine = ThreadEngine()
    run = Run.map(triple, [1], engine=engine, cluster_factory=factory, progress="none")
    assert run.results == [3]
    (kwargs,) = made
    assert kwargs["engine"] is engine and kwargs["nodes"] is None
    assert kwargs["cluster_status"] == run._on_cluster_status  # the run's
    assert "job_status" not in kwargs  # none given: no call per job for nothing


def test_run_map_refuses_what_the_engine_lacks_before_any_job() -> None:
    with pytest.raises(NotSupportedError, match="setup="):
        Run.map(triple, [1], engine=ThreadEngine(), setup=print, progress="none")


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    with dispynb_shell() as shell:
        yield shell


def session_of(ip: InteractiveShell) -> Session:
    magics = ip.magics_manager.registry[DispyMagics.__name__]
    assert isinstance(magics, DispyMagics)
    return magics.session


def test_cell_magic_runs_on_the_session_engine(ip: InteractiveShell) -> None:
    engine = ThreadEngine()
    session = session_of(ip)
    session.use_engine(engine, "this process")
    assert len(engine.opened) == 1  # the probe set a computation up
    assert [row.name for row in session.rows()] == ["threads"]
    with capture_output():
        ip.run_cell_magic(
            "dispy",
            '--over "range(4)" --into run --progress none',
            "def quad(x):\n    return 4 * x\n",
        )
    run = ip.user_ns["run"]
    assert run.wait(timeout=30)
    assert run.results == [0, 4, 8, 12]
    assert run.cluster.engine is engine
    assert "threads engine: this process" in repr(ip.run_line_magic("dispy", "status"))
    with pytest.raises(UsageError, match="--on is for dispynb's node servers"):
        ip.run_cell_magic(
            "dispy", '--over "[1]" --on threads', "def f(x):\n    return x\n"
        )
    with capture_output():
        ip.run_line_magic("dispy", "close")
    assert engine.closed and session.engine is None


def test_engine_that_cannot_set_up_is_not_kept(ip: InteractiveShell) -> None:
    class Broken(ThreadEngine):
        def open(self, events: Any, config: Any) -> Any:
            raise NotSupportedError("this engine is down")

    engine = Broken()
    session = session_of(ip)
    with pytest.raises(MagicError, match="this engine is down"):
        session.use_engine(engine, "nowhere")
    assert session.engine is None and not session.attached and engine.closed


def test_an_engine_that_cannot_set_up_keeps_the_one_in_use(
    ip: InteractiveShell,
) -> None:
    """Switching to an engine that fails its check keeps the working one (it was
    closed first, leaving the notebook with nothing to run on), and says so."""

    class Broken(ThreadEngine):
        def open(self, events: Any, config: Any) -> Any:
            raise NotSupportedError("this engine is down")

    working, broken = ThreadEngine(), Broken()
    session = session_of(ip)
    session.use_engine(working, "this process")
    with pytest.raises(MagicError) as raised:
        session.use_engine(broken, "nowhere")
    assert "still in use: threads engine: this process" in str(raised.value)
    assert session.engine is working and not working.closed and broken.closed
    with capture_output():
        ip.run_line_magic("dispy", "close")
    assert working.closed
