"""dispynb on a real Ray cluster: the jobs' arguments and results (large ones intact,
pickled once, ``ray.put`` handles as arguments). Runs as test_ray.py does (see its
docstring)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

import dispynb
from dispynb import JobCluster
from dispynb.backends.ray import RayEngine
from dispynb.errors import NotSupportedError
from dispynb.job import JobStatus
from tests.backends.raywork import (
    WAIT,
    wait_for,
)

#: Ray's driver keeps its connections to the actors' workers (its cache).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("allow_engine_sockets"),
]


# -- computations (by value, as from a notebook) ------------------------------------


def digest(value: Any) -> tuple[str, str, Any]:
    """``value``'s type, the SHA-256 of its bytes (of every buffer in it, in order),
    and ``value`` itself back (a large result)."""
    import hashlib

    return type(value).__name__, hashlib.sha256(flat_bytes(value)).hexdigest(), value


def flat_bytes(value: Any) -> bytes:
    if isinstance(value, list | tuple):
        return b"".join(flat_bytes(item) for item in value)
    if isinstance(value, dict):
        return b"".join(flat_bytes(value[key]) for key in sorted(value))
    return bytes(memoryview(value).cast("B"))


class CountsPickles:
    """A result that comes back as ``{"times": how many times it was pickled}``."""

    pickled = 0  # in the process that made it

    def __init__(self) -> None:
        self.made_at = type(self).pickled

    def __reduce__(self) -> tuple[Any, ...]:
        type(self).pickled += 1
        return (dict, ([("times", type(self).pickled - self.made_at)],))


class LoadsNowhere:
    """A result that pickles, whose pickle cannot be loaded."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (int, ("not a number",))


def returns_counted(kind: str) -> Any:
    print("returning", kind)
    if kind == "bad":
        return LoadsNowhere()
    return {"counted": CountsPickles()}


def total(values: Any) -> int:
    return sum(values)


def first_kind(values: Any) -> str:
    return type(values[0]).__name__


# -- tests ----------------------------------------------------------------------------


def test_large_arguments_and_results_of_several_types_arrive_intact(
    engine: RayEngine,
) -> None:
    """Arguments of megabytes (Ray's object store) of the usual buffer types, alone
    and nested in containers, reach the job whole and come back as its result."""
    numpy = pytest.importorskip("numpy")
    size = 3_000_000
    raw = os.urandom(size)
    array = numpy.frombuffer(os.urandom(size), dtype=numpy.float64)
    values: list[Any] = [
        raw,
        bytearray(raw[::-1]),
        array,
        [raw[:100], bytearray(os.urandom(size)), {"x": raw[1:], "y": array[:10]}],
        (b"small", raw, array.reshape(-1, 5)),
    ]
    with JobCluster(digest, engine=engine) as cluster:
        jobs = [cluster.submit(value) for value in values]
        replies = [job() for job in jobs]
    for value, job, reply in zip(values, jobs, replies, strict=True):
        assert job.status == JobStatus.Finished, job.exception
        kind, checksum, back = reply
        assert kind == type(value).__name__
        assert checksum == hashlib.sha256(flat_bytes(value)).hexdigest()
        assert flat_bytes(back) == flat_bytes(value)
        assert type(back) is type(value)


def test_a_result_is_pickled_once_and_one_that_cannot_be_loaded_says_so(
    engine: RayEngine,
) -> None:
    """The actor pickles a result (to say what in it cannot be pickled): Ray carries
    those bytes, not the result pickled once more (before, twice: a result of
    millions of objects cost twice the time), alone or in a batch. A result whose
    pickle cannot be loaded here ends Terminated in the words of dispynb's nodes,
    with the job's output."""
    with JobCluster(returns_counted, engine=engine) as cluster:
        job = cluster.submit("one")
        assert job()["counted"] == {"times": 1}, job.exception
        jobs = [cluster.submit("many") for _ in range(200)]
        wait_for(lambda: all(job.done() for job in jobs), "the 200 jobs")
        backend: Any = cluster._backend
        assert backend._batches_sent > 0, "no batch was sent"
        assert {job.result["counted"]["times"] for job in jobs} == {1}
        bad = cluster.submit("bad")
        assert bad() is None
    assert bad.status is JobStatus.Terminated
    assert bad.stdout == "returning bad\n"
    assert bad.exception.startswith("the result cannot be unpickled here: "), (
        bad.exception
    )
    assert "ValueError: invalid literal for int()" in bad.exception, bad.exception


def test_ray_put_handles_are_jobs_arguments_as_put_says(engine: RayEngine) -> None:
    """``put`` is refused on Ray saying to pass ``ray.put``'s handle as an
    argument instead: doing so gives the job the object."""
    import ray

    with JobCluster(total, engine=engine) as cluster:
        with pytest.raises(NotSupportedError, match=r"ray\.put\(obj\)"):
            cluster.put([1, 2, 3])
        job = cluster.submit(ray.put(list(range(100))))
        assert job() == 4950, job.exception
        # A keyword too, as f.remote(values=ref) (the job got the handle).
        job = cluster.submit(values=ray.put(list(range(10))))
        assert job() == 45, job.exception


def test_an_executor_calls_ray_put_handles_are_objects_as_in_a_ray_task(
    engine: RayEngine,
) -> None:
    """As ``f.remote(ref)`` and ``f.remote(values=ref)``: a call's ObjectRef
    argument reaches it as the object; one inside a list stays a handle (as
    Ray's). The call got the handle itself, not as a Ray user expects."""
    import ray

    ref = ray.put(list(range(100)))
    with dispynb.Executor(engine=engine) as executor:
        assert executor.submit(total, ref).result(timeout=WAIT) == 4950
        assert executor.submit(total, values=ref).result(timeout=WAIT) == 4950
        assert list(executor.map(total, [[1, 2], ref, [3]], chunksize=3)) == [
            3,
            4950,
            3,
        ]
        kind = executor.submit(first_kind, [ref]).result(timeout=WAIT)
        assert kind == "ObjectRef"
