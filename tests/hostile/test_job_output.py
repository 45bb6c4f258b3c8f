"""Bounded output and results (issue 13 items 6, 7 and 10), on real node processes."""

from __future__ import annotations

import contextlib
import os
import re
import sys

import psutil
import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from dispynb.errors import SetupError
from dispynb.jobenv import OUTPUT_OPTION
from tests.hostile.tools import limited_node
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

MiB = 1 << 20


# --- run on nodes -------------------------------------------------------------


def flood(mib: int) -> int:
    """Write ``mib`` MiB to stdout and one line to stderr, in 1 MiB writes."""
    chunk = "x" * (MiB - 1) + "\n"
    for _ in range(mib):
        sys.stdout.write(chunk)
    print("done", file=sys.stderr)
    return mib


def size_of(data: bytes) -> int:
    return len(data)


def big_result(size: int) -> bytes:
    return bytes(size)


def unpicklable() -> object:
    return [1, {"a": (x for x in range(3)), "b": 2}]


# --- tests ----------------------------------------------------------------------

#: One attack, tried on a job and on a setup.
HUGE_TRACEBACK = pytest.mark.attack(
    id="huge-traceback",
    title="A job, or a setup, raises an exception whose message is 64 MiB",
    goal="the traceback kept to max_output_size (4 MiB) with a marker, its exception "
    "named, a setup's error line to 1,000 characters; node growth bounded (was: all "
    "64 MiB sent to the node and the client)",
)


@pytest.fixture(scope="module")
def local():
    with LocalCluster(cpus=1) as cluster:
        yield cluster


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.attack(
    id="stdout-flood",
    title="A job writes 200 MiB to stdout",
    goal="output kept to max_output_size (4 MiB) with a marker; node growth bounded",
)
def test_200_mib_of_stdout_is_cut_to_max_output_size(local, measure):
    node = local.pids[0]
    with JobCluster(flood, nodes=local) as cluster:
        cluster.submit(1)()  # the worker exists: its start is not counted
        before = _rss(node)
        job = cluster.submit(200)
        assert job() == 200, job.exception
        grown = _rss(node) - before
    measure(
        f"delivered {len(job.stdout) / MiB:.1f} MiB; node grew "
        f"{grown / MiB:.0f} MiB (was +790 MiB)"
    )
    kept, marker = job.stdout.rsplit("\n[dispynb: ", 1)
    assert len(kept) + 1 == 4 * MiB  # the default max_output_size (+ its "\n")
    assert marker.startswith(f"{196 * MiB} more characters of stdout dropped")
    assert "max_output_size" in marker
    assert job.stderr == "done\n"
    assert grown < 40 * MiB, f"node grew by {grown / MiB:.0f} MiB"


def flood_text(char: str, mib: int) -> int:
    """Write ``mib`` MiB (in UTF-8) of ``char`` to stdout, in lines of 1 MiB."""
    line = char * (MiB // len(char.encode()) - 1) + "\n"
    for _ in range(mib):
        sys.stdout.write(line)
    return mib


@pytest.mark.attack(
    id="emoji-output",
    title="4 jobs at once each print 40 MiB of emoji (4 bytes a character in UTF-8) "
    "on a node of 4 CPUs",
    goal="each keeps max_output_size (4 M characters) with a marker; the node's "
    "peak growth under twice the 4 outputs (128 MiB; was 252 MiB: each decoded "
    "to a str of 4 bytes a character and encoded again to be sent)",
)
@pytest.mark.timeout(120)
def test_jobs_printing_emoji_cost_the_node_their_utf8_size(measure):
    with LocalCluster(cpus=4) as cluster_nodes:
        node = cluster_nodes.pids[0]
        with JobCluster(flood_text, nodes=cluster_nodes) as cluster:
            for job in [cluster.submit("x", 1) for _ in range(4)]:
                job()  # the workers exist: their start is not counted
            before = _peak_rss(node)
            jobs = [cluster.submit("\U0001f600", 40) for _ in range(4)]
            for job in jobs:
                assert job() == 40, job.exception
            grown = _peak_rss(node) - before
    measure(f"node peak +{grown / MiB:.0f} MiB for 4 outputs of 16 MiB in UTF-8")
    for job in jobs:
        kept, marker = job.stdout.rsplit("\n[dispynb: ", 1)
        assert len(kept) + 1 == 4 * MiB and kept.startswith("\U0001f600" * 100)
        assert "more characters of stdout dropped" in marker
    assert grown < 128 * MiB, f"node peak +{grown / MiB:.0f} MiB"


def print_surrogates(count: int) -> int:
    """Print ``count`` lone surrogates (a file name decoded with os.fsdecode) on
    stdout, and as many on stderr."""
    name = os.fsdecode(b"caf\xe9 ")
    print(name * count, end="")
    print(name * count, end="", file=sys.stderr)
    return count


def test_a_job_printing_a_lone_surrogate_keeps_its_output(local):
    """A file name decoded with os.fsdecode and printed: its lone surrogate goes as
    its escape, as Python's stderr writes it; the worker died packing it before
    (the job lost as 'exited with status 1', its output with it)."""
    with JobCluster(print_surrogates, nodes=local) as cluster:
        for count in (1, 10_000):  # small, and large (sent as UTF-8)
            job = cluster.submit(count)
            assert job() == count, job.exception
            assert job.stdout == job.stderr == "caf\\udce9 " * count


def close_output_files(close: bool) -> int:
    """Close (with ``close``) the files this worker's descriptors 1 and 2 write
    to (nameless: "(deleted)" in /proc), as a job closing descriptors it did not
    open would; then print, and write below Python."""
    closed = 0
    for fd in map(int, os.listdir("/proc/self/fd")):
        with contextlib.suppress(OSError):
            if close and fd > 2 and "/#" in os.readlink(f"/proc/self/fd/{fd}"):
                os.close(fd)
                closed += 1
    print("printed")
    os.system("echo below")
    return closed


def test_a_job_closing_its_workers_output_files_keeps_its_result(local):
    """Its result and what it printed arrive, with a line in its stderr saying what
    it wrote below Python is lost; the worker's next jobs run (was: the job lost
    as 'worker exited with status 1', its output with it)."""
    with JobCluster(close_output_files, nodes=local) as cluster:
        job = cluster.submit(True)
        assert job() >= 2, job.exception
        assert job.stdout == "printed\n"
        assert "the job closed its worker's files for output below Python" in (
            job.stderr
        )
        after = cluster.submit(False)
        assert after() == 0, after.exception
        assert after.stdout.startswith("printed\n")


def close_all_descriptors() -> int:
    """Close every descriptor over 2, as a daemonizing library does."""
    os.closerange(3, 1 << 16)
    return 1


def test_a_job_closing_its_workers_channel_is_told_so(local):
    """The worker's channel to the node closed with the rest: the job fails saying
    so and what to do (was: 'exited with status 0 (os._exit() or a fatal error in
    an extension)'); the next job runs."""
    with JobCluster(close_all_descriptors, nodes=local) as cluster:
        job = cluster.submit()
        job()
        assert job.status == DispyJob.Terminated, (job.status, job.result)
        assert "the job closed its worker's channel to the node" in job.exception
        assert "status 0" not in job.exception
        again = cluster.submit()
        again()
        assert again.status == DispyJob.Terminated  # ran: its worker a new one
        assert "the job closed its worker's channel" in again.exception


def raise_huge(mib: int) -> None:
    raise ValueError("x" * (mib * MiB))


@HUGE_TRACEBACK
def test_a_64_mib_exception_message_is_cut_to_max_output_size(local, measure):
    node = local.pids[0]
    with JobCluster(raise_huge, nodes=local) as cluster:
        cluster.submit(0)()  # the worker exists: its start is not counted
        before = _rss(node)
        job = cluster.submit(64)
        job()
        grown = _rss(node) - before
    measure(
        f"delivered {len(job.exception) / MiB:.1f} MiB of traceback; node grew "
        f"{grown / MiB:.0f} MiB"
    )
    assert job.status == DispyJob.Terminated
    kept, marker = job.exception.rsplit("\n[dispynb: ", 1)
    # the default max_output_size (4 MiB), and what the client adds to it
    assert 4 * MiB <= len(kept) < 4 * MiB + 1024 and "ValueError: xxx" in kept
    assert "characters of the traceback dropped" in marker
    assert "max_output_size" in marker
    assert grown < 40 * MiB, f"node grew by {grown / MiB:.0f} MiB"


def setup_raising_huge() -> None:
    raise ValueError("x" * (64 * MiB))


@HUGE_TRACEBACK
def test_a_setup_s_64_mib_exception_message_is_cut(local, measure):
    with (
        pytest.raises(SetupError) as raised,
        JobCluster(size_of, nodes=local, setup=setup_raising_huge) as cluster,
    ):
        cluster.submit(b"")()
    said, shown = str(raised.value), raised.value.remote_traceback or ""
    measure(f"setup: the error said {len(said)} characters, its traceback {len(shown)}")
    assert len(said) < 2000 and "setup raised ValueError: xxx" in said
    assert "more characters)" in said
    kept, marker = shown.rsplit("\n[dispynb: ", 1)
    assert len(kept) == 4 * MiB and "ValueError: xxx" in kept
    assert "characters of the traceback dropped" in marker


def test_max_output_size_is_configurable_and_none_keeps_all(local):
    with JobCluster(flood, nodes=local, max_output_size="1M") as cluster:
        job = cluster.submit(3)
        job()
    assert job.stdout.startswith("x" * 1000)
    assert f"{2 * MiB} more characters of stdout dropped" in job.stdout
    with JobCluster(flood, nodes=local, max_output_size=None) as cluster:
        job = cluster.submit(3)
        job()
    assert len(job.stdout) == 3 * MiB


def test_output_over_the_client_message_size_arrives_whole_in_chunks(local):
    """A client taking messages of 2 MiB at most, keeping all output: a job that
    prints three times that (and a line on stderr) gets all of it, once; the
    connection to the node survives (the next job runs on it)."""
    limit = 2 * MiB
    with JobCluster(
        flood, nodes=local, max_message_size=limit, max_output_size=None
    ) as cluster:
        job = cluster.submit(6)
        assert job() == 6, job.exception
        assert job.stdout == ("x" * (MiB - 1) + "\n") * 6
        assert job.stderr == "done\n"
        assert cluster.submit(1)() == 1


def test_a_client_with_a_small_max_message_size_gets_results_up_to_it(local):
    """max_message_size of 8 MiB with the default max_output_size (4 M characters,
    up to 32 MiB of two outputs in UTF-8): results up to the limit, less a
    header's room, arrive (large ones in chunks); one over it is a clear error."""
    with JobCluster(big_result, nodes=local, max_message_size=8 * MiB) as cluster:
        assert cluster.submit(5)() == bytes(5)
        assert cluster.submit(6 * MiB)() == bytes(6 * MiB)
        job = cluster.submit(8 * MiB)
        assert job() is None
        assert "ResultTooLarge" in job.exception and "max_result_size" in job.exception


def test_a_bytes_result_cut_to_a_small_limit_keeps_its_bytes_hint(local, monkeypatch):
    """A 6 MiB bytes result to a client taking 8 MiB messages arrives in chunks
    marked as bytes (kind "b"), so the client builds the bytes object in place:
    before, the node batched it and cut it to the limit without the hint, and the
    client filled a bytearray and copied it into bytes (twice the result)."""
    import dispynb.scheduler.results as results

    kinds: list[str] = []
    add_chunk = results.add_chunk

    def recording(streams, stream_id, message, buffers, *args):  # type: ignore[no-untyped-def]
        if message.index > 0:  # the result's out-of-band buffers (0: its pickle)
            kinds.append(message.kind)
        return add_chunk(streams, stream_id, message, buffers, *args)

    monkeypatch.setattr(results, "add_chunk", recording)
    with JobCluster(big_result, nodes=local, max_message_size=8 * MiB) as cluster:
        assert cluster.submit(6 * MiB)() == bytes(6 * MiB)
    assert len(kinds) >= 2 and set(kinds) == {"b"}, kinds


def send_file_of(size: int) -> int:
    """Write a file of ``size`` bytes and send it to the client."""
    with open("out.bin", "wb") as out:
        out.write(bytes(size))
    return dispy_send_file("out.bin")  # type: ignore[name-defined]  # noqa: F821


def test_a_file_over_the_client_message_size_is_refused_in_the_job(local, tmp_path):
    """A client taking messages of 8 MiB at most: a job sending it a 12 MiB file
    gets -1 (dispy_send_file's failure: the node logs why), the client keeps its
    node, and a file within the limit arrives."""
    with JobCluster(
        send_file_of, nodes=local, max_message_size=8 * MiB, files_dir=str(tmp_path)
    ) as cluster:
        assert cluster.submit(12 * MiB)() == -1
        assert not (tmp_path / "out.bin").exists()
        assert cluster.submit(2 * MiB)() == 0
    assert (tmp_path / "out.bin").stat().st_size == 2 * MiB


def provisional_of(size: int) -> int:
    """Send a provisional result of ``size`` bytes; dispy_provisional_result's
    answer."""
    return dispy_provisional_result(bytes(size))  # type: ignore[name-defined]  # noqa: F821


def test_a_provisional_result_over_the_client_message_size_is_refused_in_the_job(
    local,
):
    """A client taking messages of 8 MiB at most: a job's 12 MiB provisional result
    is refused in the job (-1, as any provisional result that cannot be sent), the
    client keeps its node, and a smaller one arrives."""
    with JobCluster(provisional_of, nodes=local, max_message_size=8 * MiB) as cluster:
        assert cluster.submit(12 * MiB)() == -1
        job = cluster.submit(2 * MiB)
        assert job() == 0


def fail_loudly(size: int) -> None:
    raise ValueError("y" * size)


def test_an_exception_over_the_client_message_size_arrives_whole(local):
    """A client taking messages of 2 MiB at most, keeping all output: a job whose
    exception's text is three times that gets it whole (in chunks), and the client
    keeps its node."""
    with JobCluster(
        fail_loudly, nodes=local, max_message_size=2 * MiB, max_output_size=None
    ) as cluster:
        job = cluster.submit(6 * MiB)
        job()
        assert job.status == DispyJob.Terminated
        assert "ValueError: " + "y" * (6 * MiB) in job.exception
        again = cluster.submit(1)
        again()
        assert again.status == DispyJob.Terminated  # ran (not Abandoned: no node)
        assert again.exception.rstrip().endswith("ValueError: y")


def test_a_result_over_max_result_size_is_a_clear_error(local):
    with JobCluster(big_result, nodes=local, max_result_size="1M") as cluster:
        job = cluster.submit(2 * MiB)
        assert job() is None
        assert job.status == DispyJob.Terminated
        assert "ResultTooLarge" in job.exception
        assert re.search(
            r"pickles to 2097\d{3} bytes, over the limit of 1048576", job.exception
        )
        assert "max_result_size" in job.exception
        ok = cluster.submit(MiB // 2)
        assert ok() == bytes(MiB // 2)


@pytest.mark.attack(
    id="huge-result",
    title="A job returns a result larger than a message may be",
    goal="ResultTooLarge naming the size and max_result_size, checked in the worker",
)
def test_a_result_over_the_message_cap_is_refused_before_sending(local, measure):
    # 1.5 GiB used to end "worker exited with status 0": now named, and fast.
    with JobCluster(big_result, nodes=local, max_message_size=64 * MiB) as cluster:
        job = cluster.submit(80 * MiB)
        job()
        measure(f"{job.status.name}: {job.exception.splitlines()[0][:90]}")
        assert job.status == DispyJob.Terminated
        assert "ResultTooLarge" in job.exception


def test_unpicklable_result_names_its_path(local):
    with JobCluster(unpicklable, nodes=local) as cluster:
        job = cluster.submit()
        job()
    assert job.status == DispyJob.Terminated
    assert "result[1]['a'] is a 'generator'" in job.exception


def _peak_rss(pid: int) -> int:
    """The most memory process ``pid`` has held (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        line = next(ln for ln in status if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


#: One attack, with no limit of the client's and with one over the node's room.
UNBOUNDED_OUTPUT = pytest.mark.attack(
    id="unbounded-output",
    title="A client keeps all output (max_output_size=None) and its job prints 200 MiB "
    "to a node of --max-message-size 64M; another sets max_output_size='200M'",
    goal="output kept to a quarter of the node's message size with a marker, the "
    "result delivered, the node's peak growth under 32 MiB (was: the worker dropped "
    "as 'exited with status 0', all output lost; with 200 M, every result refused "
    "as too large, and 900 MiB of node growth for 300 MiB printed)",
)


@UNBOUNDED_OUTPUT
@pytest.mark.timeout(120)
def test_output_kept_whole_is_bounded_by_the_nodes_message_size(measure, tmp_path):
    with (
        limited_node(tmp_path / "node", "--max-message-size", "64M") as node,
        JobCluster(
            flood, nodes=[node.spec], secret=node.secret, max_output_size=None
        ) as cluster,
    ):
        assert cluster.submit(1)() == 1  # the worker exists: its start not counted
        before = _peak_rss(node.proc.pid)
        job = cluster.submit(200)
        job()
        grown = _peak_rss(node.proc.pid) - before
    measure(
        f"None: {job.exception or job.result} (status {job.status}); delivered "
        f"{len(job.stdout or '') / MiB:.1f} MiB of stdout; node peak +{grown / MiB:.0f}"
        " MiB"
    )
    assert job.status == DispyJob.Finished and job.result == 200, job.exception
    kept, marker = job.stdout.rsplit("\n[dispynb: ", 1)
    assert len(kept) + 1 == 2 * MiB  # 64 MiB / 32 characters
    assert marker.startswith(f"{198 * MiB} more characters of stdout dropped")
    assert grown < 32 * MiB


@UNBOUNDED_OUTPUT
def test_a_max_output_size_over_the_nodes_room_leaves_results_room(local, measure):
    with JobCluster(flood, nodes=local, max_output_size="200M") as cluster:
        job = cluster.submit(2)
        job()
    measure(f"200M: {(job.exception or '').strip()[:80] or job.result}")
    assert job.status == DispyJob.Finished and job.result == 2, job.exception
    assert job.stdout == ("x" * (MiB - 1) + "\n") * 2


@pytest.mark.timeout(120)
def test_the_marker_names_the_nodes_cap_when_it_applied(tmp_path):
    """The node's own cap (a quarter of its --max-message-size) kept the output:
    the marker says so, and how to raise it (was: "(max_output_size)", which a
    larger max_output_size does not raise); the client's own limit keeps its name."""
    stdouts = []
    with limited_node(tmp_path / "node", "--max-message-size", "4M") as node:
        for limit in (None, 1000):
            with JobCluster(
                flood, nodes=[node.spec], secret=node.secret, max_output_size=limit
            ) as cluster:
                job = cluster.submit(1)
                job()
            assert job.status == DispyJob.Finished, job.exception
            stdouts.append(job.stdout)
    cap = 4 * MiB // 32
    assert stdouts[0].rsplit("\n[dispynb: ", 1)[1] == (
        f"{MiB - cap} more characters of stdout dropped: a job keeps {cap} (the "
        f"node's own cap, a quarter of its --max-message-size of {4 * MiB} bytes: "
        "start the node with a larger one)]\n"
    )
    assert stdouts[1].endswith(f"a job keeps 1000 ({OUTPUT_OPTION})]\n")


@pytest.mark.attack(
    id="large-output-copies",
    title="A job prints 30 MiB to stdout (kept whole: max_output_size of 32 M) and "
    "returns 1 MB",
    goal="the node's peak growth under 1.3 times the output (was 2.2 times: the "
    "output copied out of the worker's message as its header was unpacked)",
)
@pytest.mark.timeout(120)
def test_a_large_output_is_held_once_by_the_node(measure, tmp_path):
    size = 30 * MiB
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(
            flood_text,
            nodes=[node.spec],
            secret=node.secret,
            max_output_size=32 * MiB,
        ) as cluster,
    ):
        assert cluster.submit("x", 1)() == 1  # the worker exists: not counted
        before = _peak_rss(node.proc.pid)
        job = cluster.submit("x", size // MiB)
        assert job() == size // MiB, job.exception
        grown = _peak_rss(node.proc.pid) - before
    measure(f"node peak +{grown / MiB:.0f} MiB for an output of {size / MiB:.0f} MiB")
    assert len(job.stdout) == size
    assert grown < 1.3 * size, f"node peak +{grown / MiB:.0f} MiB"
