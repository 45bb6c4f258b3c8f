"""The seam's own rules: feature names and the error for a missing feature."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dispynb.backends import base
from dispynb.errors import ConfigurationError, NotSupportedError


class _Engine:
    name = "toy"
    features = frozenset({base.SUBMIT_NODE})


def test_every_feature_constant_is_listed_once() -> None:
    names = [
        getattr(base, attr)
        for attr in base.__all__
        if attr.isupper() and attr != "ALL_FEATURES"
    ]
    assert sorted(names) == sorted(base.ALL_FEATURES)


def test_require_names_engine_feature_and_way_out() -> None:
    base.require(_Engine(), base.SUBMIT_NODE, "submit_node")  # declared: no error
    with pytest.raises(NotSupportedError) as raised:
        base.require(_Engine(), base.SETUP, "setup=")
    message = str(raised.value)
    assert "setup=" in message and "'toy'" in message and "'setup'" in message
    assert "engine=None" in message
    assert isinstance(raised.value, ConfigurationError)


def test_put_on_dask_or_ray_says_what_their_users_do_instead() -> None:
    """``put`` on Dask and Ray names the engine's own way (scatter, ray.put) and
    what works with dispynb's jobs there; before, only "use engine=None"."""
    from dispynb.backends.dask import DaskEngine
    from dispynb.backends.ray import RayEngine

    said = {}
    for engine in (DaskEngine("127.0.0.1:1"), RayEngine("127.0.0.1:1")):
        with pytest.raises(NotSupportedError) as raised:
            base.require(engine, base.JOB_DEPENDS, "put")
        said[engine.name] = str(raised.value)
    assert said["dask"].startswith(
        "put is not supported on the 'dask' engine (it lacks the 'job_depends' "
        "feature): Dask's own client.scatter(obj, broadcast=True) does not reach "
    ), said
    assert "have setup load it" in said["dask"], said
    assert "ray.put(obj) and submit the job with ref as an argument" in said["ray"]


def test_fresh_process_on_ray_is_one_clear_error() -> None:
    """Ray runs jobs in long-lived actors: ``fresh_process=True`` (the Executor's
    ``max_tasks_per_child``) is refused before anything connects (it was
    ignored: jobs shared their processes)."""
    from dispynb import Executor, JobCluster
    from dispynb.backends.ray import RayEngine

    engine = RayEngine("127.0.0.1:1")  # nothing listens: it must not be reached
    with pytest.raises(NotSupportedError, match=r"^fresh_process= .*'ray' engine"):
        JobCluster(abs, engine=engine, fresh_process=True)
    with pytest.raises(NotSupportedError, match="max_tasks_per_child"):
        Executor(engine=engine, max_tasks_per_child=1)


def test_max_result_size_on_an_engine_without_it_is_one_clear_error() -> None:
    """``max_result_size=`` on Dask or Ray, which do not enforce it: refused before
    anything connects, naming the option and what to do (before, it was ignored:
    a result over it came back whole, ``Finished``)."""
    from dispynb import JobCluster
    from dispynb.backends.dask import DaskEngine
    from dispynb.backends.ray import RayEngine

    # Nothing listens at these: they must not be reached.
    for engine in (DaskEngine("127.0.0.1:1"), RayEngine("127.0.0.1:1")):
        with pytest.raises(NotSupportedError) as raised:
            JobCluster(abs, engine=engine, max_result_size=1000)
        message = str(raised.value)
        assert message.startswith(
            f"max_result_size= is not supported on the {engine.name!r} engine"
        )
        assert "engine=None" in message


def test_max_pids_on_an_engine_without_it_is_one_clear_error() -> None:
    """``max_pids=32`` on Dask or Ray, which do not enforce it, is refused before
    anything connects (before, it was ignored: a job could fork past it). Its
    default (the nodes' safety net) and None (no limit) are what these engines
    give anyway, so they open as before."""
    from dispynb import JobCluster
    from dispynb.backends.dask import DaskEngine
    from dispynb.backends.ray import RayEngine
    from dispynb.limits import DEFAULT_MAX_PIDS
    from dispynb.options import ClusterOptions

    # Nothing listens at these: they must not be reached.
    for engine in (DaskEngine("127.0.0.1:1"), RayEngine("127.0.0.1:1")):
        with pytest.raises(NotSupportedError) as raised:
            JobCluster(abs, engine=engine, max_pids=32)
        message = str(raised.value)
        assert message.startswith(
            f"max_pids= is not supported on the {engine.name!r} engine"
        ), message
        assert "engine=None" in message
        for unlimited in (DEFAULT_MAX_PIDS, None):
            opts = ClusterOptions.from_kwargs(abs, max_pids=unlimited)
            base.check_options(engine, opts)  # no error


def test_result_types_on_ray_is_one_clear_error() -> None:
    """``result_types=`` on Ray, where a job runs in the process (its actor) that
    returns its result and Ray unpickles that as it likes: the restriction could
    not hold, and was silently ignored. Refused before anything connects; Dask
    (a job's runner process apart from the worker) and the nodes keep it."""
    from dispynb import JobCluster
    from dispynb.backends.dask import DaskEngine
    from dispynb.backends.ray import RayEngine
    from dispynb.options import ClusterOptions

    with pytest.raises(NotSupportedError) as raised:  # nothing listens there
        JobCluster(abs, engine=RayEngine("127.0.0.1:1"), result_types=["builtins.*"])
    message = str(raised.value)
    assert message.startswith("result_types= is not supported on the 'ray' engine")
    assert "engine=None" in message
    opts = ClusterOptions.from_kwargs(abs, result_types=["builtins.*"])
    base.check_options(DaskEngine("127.0.0.1:1"), opts)  # no error


#: A program that gives its own Dask cluster object as ``engine=`` and prints the
#: error (in a process of its own: Dask's loop thread stays for the process's life).
DASK_OBJECT_AS_ENGINE = """
import logging
from distributed import LocalCluster
from dispynb import JobCluster
from dispynb.errors import ConfigurationError
with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                  dashboard_address=None, silence_logs=logging.ERROR) as cluster:
    try:
        JobCluster(abs, engine=cluster)
    except ConfigurationError as exc:
        print(exc)
"""


def test_an_engine_named_or_a_dask_client_given_as_engine_says_what_to_write() -> None:
    """``JobCluster(f, engine="dask")`` or ``engine="ray"`` (what a Dask or Ray user
    tries first), or their own ``distributed`` cluster object: the error names the
    engine class to give and how. Before: "engine='dask' is not an engine (an
    object with ``features`` and ``open``, see dispynb.backends.base.Engine)"."""
    from dispynb import JobCluster

    expected = {
        "dask": "engine='dask' is not an engine: for Dask give "
        "engine=DaskEngine(ADDRESS) (from dispynb.backends.dask import DaskEngine; "
        "ADDRESS: the scheduler's 'tcp://HOST:8786', or your distributed.Client or "
        "Dask cluster object), or nodes=LocalCluster(engine='dask') for Dask "
        "workers on this machine",
        "Ray": "engine='Ray' is not an engine: for Ray give engine=RayEngine(ADDRESS) "
        "(from dispynb.backends.ray import RayEngine; ADDRESS: the head's "
        "'HOST:6379', 'ray://HOST:10001', 'auto', or None to start Ray here)",
    }
    for name, error in expected.items():
        with pytest.raises(ConfigurationError) as raised:
            JobCluster(abs, engine=name)
        assert str(raised.value) == error
    with pytest.raises(ConfigurationError, match="give None for dispynb's node"):
        JobCluster(abs, engine=42)
    proc = subprocess.run(
        [sys.executable, "-c", DASK_OBJECT_AS_ENGINE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert ") is not an engine: for Dask give engine=DaskEngine(" in proc.stdout
