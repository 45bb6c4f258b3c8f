"""Job limits on the node side: parsing them from job-submit, and ``RLIMIT_AS``.

The memory limit is tested in a child Python process: lowering the address-space
limit of the test process itself could fail allocations of other tests' threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from dispynb.errors import MessageError
from dispynb.protocol.messages import JobSubmit, pack_header, unpack_header
from nodeserver.computation import NodeJob, mem_limit_note, timeout_reason
from nodeserver.session import _apply_limits

MiB = 1 << 20


def _jobs() -> list[NodeJob]:
    return [NodeJob(1, 0, []), NodeJob(2, 0, [])]


def test_limits_travel_in_job_submit_and_default_to_none():
    message = JobSubmit(comp_id=3, jobs=[[1, 0, 1]], limits=[[1, 2.5, 64 * MiB]])
    header = unpack_header(pack_header(message.to_header()), trusted=True)
    assert JobSubmit.from_header(header) == message
    # A client that predates limits sends none: the jobs run unlimited.
    del header["limits"]
    assert JobSubmit.from_header(header).limits == []


def test_apply_limits_sets_only_the_named_jobs():
    jobs = _jobs()
    _apply_limits(jobs, [[2, 1, None], [1, None, 64 * MiB]])
    assert (jobs[0].timeout, jobs[0].mem_limit) == (None, 64 * MiB)
    assert (jobs[1].timeout, jobs[1].mem_limit) == (1.0, None)
    assert isinstance(jobs[1].timeout, float)


@pytest.mark.parametrize(
    "limits",
    [
        [[1, 1]],
        [[9, 1, None]],
        [[1, "1", None]],
        [[1, 0, None]],
        [[1, -2.0, None]],
        [[1, True, None]],
        [[1, None, 1.5]],
        [[1, None, -1]],
        ["x"],
    ],
)
def test_apply_limits_refuses_malformed_entries(limits):
    with pytest.raises(MessageError, match="job-submit"):
        _apply_limits(_jobs(), limits)


def test_reasons_name_the_limit_and_how_to_raise_it():
    text = timeout_reason(1.0)
    assert "ran over its time limit of 1 s (job_timeout / dispy_job_timeout)" in text
    assert "dispy_job_timeout=2" in text
    assert "probably exceeded mem_limit of 1024 bytes" in mem_limit_note(1024)


CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from dispynb.protocol import serialize
    from nodeserver.ipc import Run
    from nodeserver.jobrunner import run_job

    def allocate(size):
        return len(bytearray(size))

    def soft():
        return resource.getrlimit(resource.RLIMIT_AS)[0]

    limit = int(sys.argv[1])
    args = [memoryview(b) for b in serialize.dumps(((4 << 30,), {}))]
    over, _ = run_job(allocate, Run(key=1, attempt=0, mem_limit=limit), args)
    after = soft()
    small = [memoryview(b) for b in serialize.dumps(((1 << 20,), {}))]
    within, result = run_job(allocate, Run(key=2, attempt=0, mem_limit=limit), small)
    json.dump(
        {
            "over": [over.outcome, over.exception],
            "within": [within.outcome, serialize.loads(result)],
            "after": after,
            "infinity": resource.RLIM_INFINITY,
        },
        sys.stdout,
    )
    """
)


def test_run_job_under_mem_limit_raises_memory_error_and_restores_limit():
    limit = 512 * MiB
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(limit)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    report = json.loads(proc.stdout)
    outcome, exception = report["over"]
    assert outcome == "raised"
    assert "MemoryError" in exception
    assert f"mem_limit of {limit} bytes" in exception
    assert report["within"] == ["finished", 1 << 20]
    assert report["after"] == report["infinity"]  # the soft limit was lifted again
