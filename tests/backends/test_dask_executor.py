"""dispynb's Executor on the Dask engine, on a real ``distributed.LocalCluster``: it
runs functions (async too) with their initializers, with the semantics of
``concurrent.futures``.
Runs as test_dask.py does (see its docstring).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.backends.daskclient import (
    run,
)
from tests.multihost.netns import Network

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(120)]

pytest.importorskip("distributed")


EXECUTOR_PROGRAM = """
import asyncio
import contextlib
import io
import warnings


def square(x):
    return x * x


async def twice(x):
    await asyncio.sleep(0)
    return 2 * x


def init(word):
    warnings.warn("init " + word)


def main(args):
    shown = io.StringIO()  # what the jobs printed is written to sys.stderr
    with local_cluster() as dask_cluster, contextlib.redirect_stderr(shown):
        engine = DaskEngine(dask_cluster)
        with dispynb.Executor(
            engine=engine, initializer=init, initargs=("dask",)
        ) as executor:
            mapped = list(executor.map(square, range(8)))
            future = executor.submit(square, 12)
            futures = [executor.submit(twice, x) for x in range(4)]
            return {
                "map": mapped,
                "submit": future.result(timeout=30),
                "async": [f.result(timeout=30) for f in futures],
                "stderr": shown.getvalue(),
                "fresh_pids": fresh_pids(engine),
            }


def fresh_pids(engine):
    with dispynb.Executor(engine=engine, max_tasks_per_child=1) as executor:
        futures = [executor.submit(os.getpid) for _ in range(4)]
        return len({f.result(timeout=30) for f in futures})
"""


def test_the_executor_runs_on_dask(net: Network, tmp_path: Path) -> None:
    """``dispynb.Executor(engine=DaskEngine(...))``: map and submit (issue 18),
    async def functions run to their end, the initializer's warnings name their
    file, and max_tasks_per_child gives each job a new process, as on dispynb's
    nodes."""
    out = run(net, tmp_path, EXECUTOR_PROGRAM)
    stderr = out.pop("stderr")
    # max_tasks_per_child (fresh_process): a new process per job, as on nodes
    # (it was ignored: the 2 runners ran the 4 calls).
    assert out.pop("fresh_pids") == 4
    assert out == {
        "map": [x * x for x in range(8)],
        "submit": 144,
        "async": [0, 2, 4, 6],
    }
    assert "<dynamic-code>" not in stderr, stderr
    warned = r'client-\w+\.py:\d+: UserWarning: init dask\n  warnings.warn\("init '
    assert re.search(warned, stderr), stderr


FUTURES_PROGRAM = """
import concurrent.futures as cf


def nap(x, s):
    time.sleep(s)
    return x


def boom(x):
    raise ValueError(x)


def main(args):
    out = {}
    with local_cluster(workers=2) as dask_cluster:
        executor = dispynb.Executor(engine=DaskEngine(dask_cluster))
        futures = [executor.submit(nap, i, 1.0) for i in range(6)]
        deadline = time.monotonic() + 30
        while not futures[0].running() and time.monotonic() < deadline:
            time.sleep(0.01)
        out["cancel_queued"] = futures[-1].cancel()
        out["cancel_running"] = futures[0].cancel()
        done = cf.as_completed(futures, timeout=30)
        out["as_completed"] = sorted(
            "C" if f.cancelled() else str(f.result()) for f in done
        )
        failing, slow = executor.submit(boom, 1), executor.submit(nap, 2, 2.0)
        done, pending = cf.wait(
            [failing, slow], timeout=30, return_when=cf.FIRST_EXCEPTION
        )
        out["first_exception"] = [done == {failing}, pending == {slow}]
        values = []
        try:
            for value in executor.map(nap, [1, 2, 3], [0.1, 3, 3], timeout=0.5):
                values.append(value)
        except cf.TimeoutError:
            values.append("timeout")
        out["map_timeout"] = values
        out["chunks"] = list(executor.map(abs, range(-5, 0), chunksize=2))
        try:
            executor.submit(42).result(30)
        except TypeError as exc:
            out["not_callable"] = str(exc)
        futures = [executor.submit(nap, i, 0.5) for i in range(8)]
        executor.shutdown(wait=True, cancel_futures=True)
        out["cancelled_at_shutdown"] = sum(f.cancelled() for f in futures)
        out["all_done"] = all(f.done() for f in futures)
    return out
"""


def test_the_executor_on_dask_keeps_the_concurrent_futures_semantics(
    net: Network, tmp_path: Path
) -> None:
    """What tests/api/test_executor_conformance.py checks against
    ProcessPoolExecutor, on the Dask engine: cancel a queued call (not a running
    one), as_completed, wait(FIRST_EXCEPTION), map's timeout and chunksize, a
    non-callable raising from result(), shutdown(cancel_futures=True)."""
    out = run(net, tmp_path, FUTURES_PROGRAM)
    assert out["cancel_queued"] is True and out["cancel_running"] is False
    assert out["as_completed"] == ["0", "1", "2", "3", "4", "C"]
    assert out["first_exception"] == [True, True]
    assert out["map_timeout"] == [1, "timeout"]
    assert out["chunks"] == [5, 4, 3, 2, 1]
    assert out["not_callable"] == "'int' object is not callable"
    assert out["cancelled_at_shutdown"] >= 1 and out["all_done"]
