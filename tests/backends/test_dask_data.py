"""The Dask engine's jobs' arguments and results, on a real
``distributed.LocalCluster``: large ones of several types arrive intact, a large
argument raises no Dask advice that dispynb refuses, a Dask future in the arguments
is refused.
Runs as test_dask.py does (see its docstring).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.backends.daskclient import (
    FINISHED,
    run,
)
from tests.multihost.netns import Network

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(120)]

pytest.importorskip("distributed")


LARGE_PROGRAM = """
import hashlib
import threading


def digest(data, *more, tail=b""):
    parts = [data, *more, tail]
    return [
        [type(p).__name__, len(p), hashlib.sha256(p).hexdigest()] for p in parts
    ], bytes(data[::-1])


def main(args):
    size = 6 << 20
    blob = os.urandom(size)
    arguments = [
        ((blob,), {}),
        ((bytearray(blob[: 5 << 20]), memoryview(blob)[1 : 4 << 20]), {}),
        ((b"small",), {"tail": blob[: 3 << 20]}),
    ]
    with local_cluster() as dask_cluster:
        with dispynb.JobCluster(digest, engine=DaskEngine(dask_cluster)) as cluster:
            jobs = [cluster.submit(*a, **k) for a, k in arguments]
            try:
                import threading

                cluster.submit(threading.Lock())
                refused = None
            except dispynb.errors.SerializationError as exc:
                refused = str(exc)
            outcomes = []
            for job, (a, _) in zip(jobs, arguments):
                parts, reversed_data = job()
                expected = bytes(a[0][::-1])
                outcomes.append(
                    [int(job.status), job.exception, parts, reversed_data == expected]
                )
        return {
            "outcomes": outcomes,
            "expected": [
                [[type(p).__name__, len(p), hashlib.sha256(p).hexdigest()]
                 for p in [*a, k.get("tail", b"")]]
                for a, k in arguments
            ],
            "refused": refused,
        }
"""


def test_large_arguments_and_results_arrive_intact(
    net: Network, tmp_path: Path
) -> None:
    """Arguments of several MB (bytes, a bytearray, a memoryview, a keyword) reach
    the job whole and of their type (a memoryview as bytes, as on dispynb's nodes),
    and a result of several MB comes back whole; an argument that cannot be pickled
    is refused at submit, naming it."""
    out = run(net, tmp_path, LARGE_PROGRAM)
    for (status, exception, parts, reversed_ok), expected in zip(
        out["outcomes"], out["expected"], strict=True
    ):
        assert (status, exception) == (FINISHED, None)
        expected = [
            ["bytes" if kind == "memoryview" else kind, n, sha]
            for kind, n, sha in expected
        ]
        assert parts == expected
        assert reversed_ok
    assert "argument 1" in out["refused"] and "lock" in out["refused"]


LARGE_GRAPH_PROGRAM = """
import warnings


def compute(data):
    return len(data)


def main(args):
    big = os.urandom(12 << 20)  # over Dask's large-graph warning threshold (10 MB)
    from distributed import Client

    with local_cluster(workers=1) as dask_cluster:
        engine = DaskEngine(dask_cluster)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            with dispynb.JobCluster(compute, engine=engine) as cluster:
                sizes = [cluster.submit(big)()]
            with dispynb.Executor(engine=engine) as executor:
                sizes.append(executor.submit(len, big).result(timeout=60))
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            with Client(dask_cluster) as client:
                sizes.append(client.submit(len, big).result())
    return {
        "sizes": sizes,
        "ours": [str(w.message) for w in ours],
        "theirs": [str(w.message) for w in theirs],
    }
"""


def test_a_large_argument_raises_no_dask_advice_that_dispynb_refuses(
    net: Network, tmp_path: Path
) -> None:
    """A job's (or a call's) argument over 10 MB raised Dask's "Sending large
    graph" warning, whose advice (futures, scatter) dispynb refuses: not any
    more, while a user's own client.submit still warns."""
    out = run(net, tmp_path, LARGE_GRAPH_PROGRAM)
    assert out["sizes"] == [12 << 20] * 3
    assert not [w for w in out["ours"] if "large graph" in w], out["ours"]
    assert [w for w in out["theirs"] if "Sending large graph" in w], out["theirs"]


NESTED_FUTURE_PROGRAM = """
from distributed import Client


def compute(data):
    return data


def main(args):
    refused = []
    with local_cluster(workers=1) as dask_cluster, Client(dask_cluster) as client:
        scattered = client.scatter(b"x")

        class Holder:
            def __init__(self, value):
                self.value = value

        engine = DaskEngine(dask_cluster)
        with (
            dispynb.JobCluster(compute, engine=engine) as cluster,
            dispynb.Executor(engine=engine) as executor,
        ):
            for call in (
                lambda: cluster.submit([[[[[[scattered]]]]]]),
                lambda: cluster.submit({"a": {"b": {"c": {"d": [scattered]}}}}),
                lambda: cluster.submit(Holder(scattered)),
                lambda: executor.submit(len, [[[[[scattered]]]]]),
            ):
                try:
                    call()
                    refused.append("accepted")
                except dispynb.errors.NotSupportedError as exc:
                    refused.append(str(exc))
            fine = cluster.submit([[[[[["distributed.client"]]]]]])()
    return {"refused": refused, "fine": fine}
"""


def test_a_dask_future_at_any_depth_of_the_arguments_is_refused(
    net: Network, tmp_path: Path
) -> None:
    """Futures were looked for 4 levels deep in tuples, lists and dicts: one deeper,
    or in an object's attributes, went to the job, which got the Future."""
    out = run(net, tmp_path, NESTED_FUTURE_PROGRAM)
    for said in out["refused"]:
        assert said.startswith("a Dask Future (of client.scatter"), out
    assert out["fine"] == [[[[[["distributed.client"]]]]]]
