"""A job writes to its worker's own channel to the node (a descriptor it
inherited): garbage, or the prefix of a 1000 MiB frame. The job was told its
worker "exited with status 0"; the announced frame took 1000 MiB of the node's
address space, and the job hung until the frame, which never came, was in."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

MiB = 1 << 20
ANNOUNCED = 1000 * MiB
#: Buffers of a frame whose lengths table (256 KiB) is larger than a read's chunk
#: (64 KiB): its body was taken before the table came.
MANY_BUFFERS = 1 << 16


def write_to_channel(what: str) -> str:
    """Write ``what`` ("garbage", or "announce" a large frame, of one buffer or
    "announce-many") to this worker's channel, and go on for two seconds."""
    import time

    from dispynb.protocol.framing import PREFIX
    from nodeserver.jobapi import CONTEXT

    MANY_BUFFERS = 1 << 16

    assert CONTEXT.sock is not None
    if what == "garbage":
        data = b"\xff" * 64
    else:  # many buffers: a lengths table larger than the node's read chunk
        data = PREFIX.pack(ANNOUNCED, 1 if what == "announce" else MANY_BUFFERS)
    CONTEXT.sock.sock.sendall(data)
    time.sleep(2)
    return what


def _vm_peak(pid: int) -> int:
    """The peak of process ``pid``'s address space, bytes (VmPeak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmPeak")


@pytest.mark.attack(
    id="worker-channel-garbage",
    title="A job writes garbage to its worker's channel to the node, or announces "
    f"a frame of {ANNOUNCED // MiB} MiB there and goes on",
    goal="the job fails at once with its worker killed, saying that it wrote to "
    "the channel; nothing allocated for the announced frame (was: 'exited with "
    "status 0'; +1000 MiB of the node's address space, and the job hung)",
)
@pytest.mark.timeout(90)
def test_a_job_writing_to_its_workers_channel_is_told_so(tmp_path: Path, measure):
    figures = []
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(write_to_channel, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        for what in ("garbage", "announce", "announce-many"):
            before = _vm_peak(node.proc.pid)
            started = time.monotonic()
            job = cluster.submit(what)
            assert job.wait(30), "the job hangs"
            took = time.monotonic() - started
            grown = _vm_peak(node.proc.pid) - before
            assert job.status == DispyJob.Terminated, (job.status, job.result)
            assert "wrote to the worker's own channel" in job.exception
            assert "exited with status" not in job.exception
            assert grown < ANNOUNCED // 4, f"node +{grown / MiB:.0f} MiB"
            figures.append(
                f"{what}: failed in {took:.1f} s, node +{grown / MiB:.0f} MiB "
                "of address space"
            )
    measure("; ".join(figures) + f" ({job.exception.splitlines()[-1][:110]}...)")


def forge_done(key: str, count: int, traceback: bytes) -> int:
    """Send the node ``count`` `Done` messages of this job ("own") or of a job
    this worker does not run ("other"), whose traceback is ``traceback`` (bytes,
    no flag saying it is text), and ``count`` files with a bad name; then return."""
    import time

    from nodeserver.ipc import Done, SendFile
    from nodeserver.jobapi import CONTEXT

    now = time.time()
    done = Done(
        key=CONTEXT.key if key == "own" else 10**9,
        attempt=CONTEXT.attempt,
        outcome="raised",
        start_time=now,
        end_time=now,
        stdout="",
        stderr="",
        exception=traceback,
    )
    bad = SendFile(key=CONTEXT.key, attempt=CONTEXT.attempt, path="../../etc/x")
    for _ in range(count):
        CONTEXT.send(done, [])
        CONTEXT.send(bad, [b"x"])
    return count


@pytest.mark.timeout(90)
def test_a_job_forging_its_done_with_a_traceback_in_bytes_keeps_its_node(
    tmp_path: Path,
):
    """A traceback is text whatever the worker's flags say: it reaches the client
    as a str (bytes that are no UTF-8 replaced), and the client keeps its node
    (it failed on bytes there, and dropped the node: 'error handling its
    job-results message')."""
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(forge_done, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        job = cluster.submit("own", 1, b"\xffforged")
        job()
        assert job.status == DispyJob.Terminated, (job.status, job.result)
        assert job.exception == "\ufffdforged"
        assert cluster.submit("other", 0, b"")() == 0  # the node is still there


@pytest.mark.attack(
    id="worker-channel-forgery",
    title="A job sends its node 100,000 results of a job its worker does not run, "
    "and 100,000 files with a bad name, on its worker's channel",
    goal="at most 2 lines in the node's log (was: a line each, 200,000 lines, "
    "20 MB); the job's own result delivered",
)
@pytest.mark.timeout(120)
def test_a_job_forging_messages_on_its_channel_floods_no_log(tmp_path: Path, measure):
    count = 100_000
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(forge_done, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        started = time.monotonic()
        result = cluster.submit("other", count, b"")()
        took = time.monotonic() - started
    log = node.log_text()
    lines = log.count("unexpected job") + log.count("sent a file with a bad name")
    measure(
        f"{lines} log lines ({len(log)} bytes of log); the job's result in {took:.1f} s"
    )
    assert result == count
    assert lines <= 2, log[-2000:]


def forge_large_output(kind: str, size: int) -> str:
    """Send the node this job's `Done` with ``size`` characters of stdout, of
    stderr and of traceback: as str ("text") or as its UTF-8 bytes flagged so
    ("utf8"), whatever the job's max_output_size; then return."""
    import time

    from nodeserver.ipc import Done
    from nodeserver.jobapi import CONTEXT

    now = time.time()
    text: str | bytes = "o" * size
    if kind == "utf8":
        text = text.encode()
    done = Done(
        key=CONTEXT.key,
        attempt=CONTEXT.attempt,
        outcome="raised",
        start_time=now,
        end_time=now,
        stdout=text,
        stderr=text,
        exception=text,
        utf8="oex" if kind == "utf8" else "",
    )
    CONTEXT.send(done, [])
    return kind


@pytest.mark.attack(
    id="forged-done-output",
    title="A job with max_output_size=1000 sends its node its own result with 8 M "
    "(or 20,000) characters of stdout, stderr and traceback (as text, and as "
    "UTF-8 bytes)",
    goal="each kept to 1,000 characters with the marker saying how much was "
    "dropped (was: 20,000 delivered whole; 8 M refused by the client, all output "
    "lost)",
)
@pytest.mark.timeout(120)
def test_a_job_forging_its_done_keeps_max_output_size(tmp_path: Path, measure):
    limit = 1000
    figures = []
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(
            forge_large_output,
            nodes=[node.spec],
            secret=node.secret,
            max_output_size=limit,
        ) as cluster,
    ):
        # Over what the node streams (was: all of it; refused by the client, with
        # the job's output lost), and under it (was: all of it delivered).
        for kind, size in (("text", 8 * MiB), ("utf8", 8 * MiB), ("text", 20_000)):
            job = cluster.submit(kind, size)
            assert job.wait(60), "the job hangs"
            texts = (job.stdout, job.stderr, job.exception)
            lengths = ", ".join(str(len(t or "")) for t in texts)
            figures.append(f"{kind} of {size}: {lengths} chars")
            for text in texts:
                assert isinstance(text, str), type(text)
                kept, marker = text.rsplit("\n[dispynb: ", 1)
                assert kept == "o" * limit
                assert marker.startswith(f"{size - limit} more characters"), marker
                assert "max_output_size" in marker
        job = cluster.submit("text", 10)  # the node serves on; short output whole
        job()
        assert (job.stdout, job.exception) == ("o" * 10, "o" * 10)
    measure("; ".join(figures) + " delivered (stdout, stderr, traceback)")


def forge_over_limits(what: str, size: int) -> str:
    """Send the node, for this job, a provisional result ("provisional") or a file
    ("file") of ``size`` bytes, past the job's own check of its limits; then
    return."""
    import pickle

    from nodeserver.ipc import Provisional, SendFile
    from nodeserver.jobapi import CONTEXT

    if what == "provisional":
        message = Provisional(key=CONTEXT.key, attempt=CONTEXT.attempt)
        CONTEXT.send(message, [pickle.dumps(b"p" * size)])
    else:
        message = SendFile(key=CONTEXT.key, attempt=CONTEXT.attempt, path="big.bin")
        CONTEXT.send(message, [b"f" * size])
    return what


@pytest.mark.attack(
    id="forged-over-client-limits",
    title="A job whose client takes messages of 2 MB at most sends its node a "
    "provisional result, and a file, of 4 MB on its worker's channel",
    goal="neither sent to the client, the node's log says so; the client keeps the "
    "node and every job's result (was: the client dropped the node, 'peer "
    "announced a 4000092-byte message, over the 2000000-byte cap')",
)
@pytest.mark.timeout(120)
def test_a_job_forging_messages_over_its_clients_limits_keeps_its_node(
    tmp_path: Path, measure, monkeypatch: pytest.MonkeyPatch
):
    limit, size = 2_000_000, 4_000_000
    monkeypatch.chdir(tmp_path)  # where the client writes the files jobs send
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(
            forge_over_limits,
            nodes=[node.spec],
            secret=node.secret,
            max_message_size=limit,
        ) as cluster,
    ):
        jobs = [cluster.submit(what, size) for what in ("provisional", "file")]
        for job in jobs:
            job()
        results = [(job.status, job.result, job.exception) for job in jobs]
        after = cluster.submit("file", 10)  # the node is still this client's
        after()
    log = node.log_text()
    lines = [
        line.split(" WARNING ", 1)[-1]
        for line in log.splitlines()
        if "over the" in line and "its client takes" in line
    ]
    measure(f"results {[r[1] for r in results]}; node log: {lines[:2]}")
    assert results == [
        (DispyJob.Finished, "provisional", None),
        (DispyJob.Finished, "file", None),
    ]
    assert (after.status, after.result) == (DispyJob.Finished, "file")
    assert (tmp_path / "big.bin").stat().st_size == 10  # the small one only
    assert 1 <= len(lines) <= 2, log[-2000:]  # then at debug level (`log_odd`)


def forge_result(size: int) -> int:
    """Send the node this job's `Done`, finished, with a result of ``size`` bytes
    (past the job's own check of max_result_size); then return."""
    import pickle
    import time

    from nodeserver.ipc import Done
    from nodeserver.jobapi import CONTEXT

    now = time.time()
    done = Done(
        key=CONTEXT.key,
        attempt=CONTEXT.attempt,
        outcome="finished",
        start_time=now,
        end_time=now,
        stdout="",
        stderr="",
    )
    CONTEXT.send(done, [pickle.dumps(b"r" * size)])
    return size


@pytest.mark.attack(
    id="forged-result-over-cap",
    title="A job with max_result_size=1 MB sends its node its own result of 1.5 MB "
    "(sent whole) and of 70 MiB (streamed in chunks)",
    goal="neither delivered: each job fails with ResultTooLarge naming the limit "
    "(was: 1.5 MB delivered; 70 MiB ended 'the result arrived incomplete')",
)
@pytest.mark.timeout(120)
def test_a_job_forging_a_result_over_max_result_size_is_refused(
    tmp_path: Path, measure
):
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(
            forge_result,
            nodes=[node.spec],
            secret=node.secret,
            max_result_size=1_000_000,
        ) as cluster,
    ):
        jobs = [cluster.submit(size) for size in (1_500_000, 70 * MiB)]
        for job in jobs:
            job()
        small = cluster.submit(10)  # a result within the limit, as ever
        assert small() == b"r" * 10
    measure(
        "; ".join(
            f"{job.status.name}: {str(job.exception).strip()} "
            f"({len(job.result or b'')} bytes of result delivered)"
            for job in jobs
        )
    )
    for job in jobs:
        assert job.status == DispyJob.Terminated and job.result is None
        assert job.exception.startswith("dispynb.errors.ResultTooLarge: ")
        assert "over the limit of 1000000 bytes (max_result_size)" in job.exception


def forge_times(what: str) -> str:
    """End this job with a `Done` of its own whose start and end times are
    ``what`` (as a job that replaced ``time.time`` makes its worker send too);
    then return."""
    import time

    from nodeserver.ipc import Done
    from nodeserver.jobapi import CONTEXT

    when = float(what)
    done = Done(
        key=CONTEXT.key,
        attempt=CONTEXT.attempt,
        outcome="raised",
        start_time=when,
        end_time=when,
        stdout="",
        stderr="",
        exception="forged",
    )
    CONTEXT.send(done, [])
    time.sleep(0.2)  # the node reads it before this job's own end
    return what


@pytest.mark.attack(
    id="forged-job-times",
    title="Jobs end with start and end times of NaN, infinity, -infinity and 1e300 "
    "(a Done of their own, or time.time replaced in their worker)",
    goal="each reported with times of the node's clock; the client keeps the "
    "node, whose next jobs run (was: NaN in the node's mean job time, and every "
    "later submit failed on it: the node dropped its client)",
)
@pytest.mark.timeout(120)
def test_a_job_forging_its_times_keeps_its_node(tmp_path: Path, measure):
    whats = ("nan", "inf", "-inf", "1e300")
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(forge_times, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        started = time.time()
        jobs = [cluster.submit(what) for what in whats]
        for job in jobs:
            job()
        after = cluster.submit("0")
        assert after.wait(30), "the next job hangs"
        ended = time.time()
    lost = sum("was lost" in str(job.exception) for job in [*jobs, after])
    measure(
        f"{lost} jobs saw their node lost; times reported: "
        + ", ".join(f"{job.start_time}..{job.end_time}" for job in jobs)
    )
    assert lost == 0, [job.exception for job in jobs]
    for job in [*jobs, after]:
        assert job.status == DispyJob.Terminated and job.exception == "forged"
        assert started - 1 <= job.start_time <= job.end_time <= ended + 1
