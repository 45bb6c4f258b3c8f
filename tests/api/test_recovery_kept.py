"""Client crash recovery of kept results larger than the recovering client's
messages: in chunks, streamed, one at a time for a client that reads slowly."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from hashlib import sha256 as _sha256
from pathlib import Path
from typing import Any

import pytest

import dispynb
from dispynb.defaults import MAX_MESSAGE_SIZE
from dispynb.journal import Journal
from dispynb.protocol.messages import JobResults, Recover, ResultChunk
from dispynb.transport.connector import connect
from tests.api.crashclient import killed_after, start_client
from tests.jobs import wait_until
from tests.nodeproc import running_node
from tests.procmem import private_memory

MiB = 1 << 20


def sha256(data: bytes | bytearray) -> str:
    return _sha256(data).hexdigest()


pytestmark = pytest.mark.slow


# -- kept results larger than the recovering client's messages -----------------------

#: The recovering client's message size limit (recover_jobs(max_message_size=...)):
#: low, so that kept results of a few MiB are over it, as a 1+ GiB one is over the
#: default limit.
LIMIT = 1 << 20

#: A job that makes a result (``kind``: bytes, bytearray, or an int), says so with a
#: file named after it, and returns it once the test made the ``go`` file (after the
#: client was killed).
KEPT_CLIENT = """
import sys, time
import dispynb as dispy

def make(n, kind, size, marks, go, padding):
    import hashlib, os, sys, time
    data = os.urandom(size)
    text = ("\u00e9" + data.hex())[:size]  # "print": what it prints (not ASCII)
    made = text.encode() if kind == "print" else data
    mark = "%d-%s-%s" % (n, kind, hashlib.sha256(made).hexdigest())
    open(os.path.join(marks, mark), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    if kind == "print":  # on stdout, and backwards on stderr
        print(text, end="")
        print(text[::-1], end="", file=sys.stderr)
    if kind in ("int", "print"):
        return n * n
    return bytearray(data) if kind == "bytearray" else data

node, secret, journal, marks, go = sys.argv[1:6]
# kind:size[:padding]: padding, bytes of argument (1 MiB or more: the arguments, and
# then the result, go through shared memory)
specs = [(spec.split(":") + ["0"])[:3] for spec in sys.argv[6:]]
cluster = dispy.JobCluster(make, nodes=[node], secret=secret, recover_file=journal)
for n, (kind, size, padding) in enumerate(specs):
    cluster.submit_job_id("job-%d" % n, n, kind, int(size), marks, go,
                          bytes(int(padding)))
print("submitted", flush=True)
time.sleep(60)  # killed before it gets further
"""

RECOVER_KEPT = """
import hashlib, json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(sys.argv[1], timeout=30, secret=sys.argv[2],
                          max_message_size=int(sys.argv[3]))
out = []
for job in jobs:
    value = job.result
    if isinstance(value, (bytes, bytearray)):
        value = [type(value).__name__, len(value), hashlib.sha256(value).hexdigest()]
    out.append([job.id, int(job.status), value, job.exception])
print(json.dumps(out))
"""


def kill_client_with_kept_results(
    tmp_path: Path, node: Any, specs: list[str]
) -> tuple[Path, dict[int, list[object]]]:
    """Run KEPT_CLIENT's jobs (``kind:size`` each) until all run on the node, SIGKILL
    the client, let the jobs end; return the journal and each job's expected
    result (as RECOVER_KEPT prints it)."""
    journal, marks, go = tmp_path / "journal.db", tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    client = start_client(
        tmp_path, KEPT_CLIENT, node.spec, node.secret, str(journal), str(marks),
        str(go), *specs,
    )  # fmt: skip
    with killed_after(client):
        wait_until(lambda: len(list(marks.iterdir())) == len(specs))
    go.touch()  # the jobs end now, their client gone: the node keeps the results
    expected: dict[int, list[object]] = {}
    for mark in marks.iterdir():
        n, kind, digest = mark.name.split("-")
        size = int(specs[int(n)].split(":")[1])
        value = int(n) ** 2 if kind in ("int", "print") else [kind, size, digest]
        expected[int(n)] = value  # type: ignore[assignment]
    return journal, expected


def kept_files(node_dir: Path) -> list[Path]:
    """The result files a node spooled for clients that may come back."""
    return list((node_dir / "dest" / ".kept").glob("*/r*"))


def recover_kept(
    tmp_path: Path, specs: list[str], script: str
) -> tuple[list[Any], str, dict[int, list[object]]]:
    """`kill_client_with_kept_results`, then ``script`` recovers them in a new
    process, accepting messages of `LIMIT` bytes at most: its JSON output, its
    stderr and the expected results (the node dropped what was collected)."""
    (tmp_path / "recover.py").write_text(script)
    with running_node(tmp_path / "node", cpus=len(specs)) as node:
        journal, expected = kill_client_with_kept_results(tmp_path, node, specs)
        wait_until(lambda: len(kept_files(tmp_path / "node")) == len(specs))
        done = subprocess.run(
            [sys.executable, "recover.py", str(journal), node.secret, str(LIMIT)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        # Collected: the node drops them.
        wait_until(lambda: not kept_files(tmp_path / "node"))
    return json.loads(done.stdout), done.stderr, expected


def test_recover_jobs_gets_kept_results_over_its_message_size_limit(
    tmp_path: Path,
) -> None:
    """A client SIGKILLed before it collected anything; recover_jobs, in a new
    process, accepting messages of 1 MiB at most, gets every result: small ones,
    a bytearray over half its limit and a bytes result three times its limit
    (streamed in chunks, each message within the limit), each whole, of its type."""
    specs = [f"bytes:{3 * LIMIT + 7}", f"bytearray:{LIMIT + LIMIT // 4}"]
    specs += [f"int:{n}" for n in range(8)]
    jobs, stderr, expected = recover_kept(tmp_path, specs, RECOVER_KEPT)
    assert jobs == [[f"job-{n}", 11, expected[n], None] for n in range(len(specs))], (
        stderr
    )


RECOVER_OUTPUT = """
import hashlib, json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(sys.argv[1], timeout=30, secret=sys.argv[2],
                          max_message_size=int(sys.argv[3]))
print(json.dumps([
    [job.id, int(job.status), job.result, job.exception, len(job.stdout),
     hashlib.sha256(job.stdout.encode()).hexdigest(), job.stderr == job.stdout[::-1]]
    for job in jobs
]))
"""


def test_recover_jobs_gets_a_kept_stdout_over_its_message_size_limit(
    tmp_path: Path,
) -> None:
    """A job that printed three times the recovering client's message size limit
    (on stdout, and as much on stderr) after its client was SIGKILLed: recover_jobs
    gets its output whole, once, and the other job's result too."""
    size = 3 * LIMIT + 7
    specs = [f"print:{size}", "int:1"]
    jobs, stderr, _expected = recover_kept(tmp_path, specs, RECOVER_OUTPUT)
    digest = next(m.name.split("-")[2] for m in (tmp_path / "marks").iterdir()
                  if m.name.startswith("0-"))  # fmt: skip
    assert jobs == [
        ["job-0", 11, 0, None, size, digest, True],
        ["job-1", 11, 1, None, 0, _sha256(b"").hexdigest(), True],
    ], stderr


@pytest.mark.parametrize("padding", [0, 2 * MiB], ids=["socket", "shared-memory"])
def test_a_node_holds_one_kept_result_at_a_time_for_a_client_that_reads_slowly(
    tmp_path: Path, padding: int
) -> None:
    """64 MiB of kept results: the node reads them from disk one by one as the
    recovering client takes them (a client that has read one chunk leaves the
    node's own memory about where it was, not 64 MiB higher); the client that went
    away before the end leaves them kept, and a later recover_jobs gets them all."""
    size = 8 * MiB
    specs = [f"bytes:{size}:{padding}"] * 8
    with running_node(tmp_path / "node", cpus=len(specs)) as node:
        journal, expected = kill_client_with_kept_results(tmp_path, node, specs)
        wait_until(lambda: len(kept_files(tmp_path / "node")) == len(specs))
        pid = node.proc.pid
        held = private_memory(pid)
        (recovery_id, _name, _nodes), *_ = Journal(str(journal)).computations()

        async def read_a_little() -> list[int]:
            conn, _ = await connect(
                "127.0.0.1", node.port, secret=node.secret.encode(),
                max_message_size=LIMIT,
            )  # fmt: skip
            grown = []
            try:
                conn.write(
                    Recover(comp_id=1, recovery_id=recovery_id, max_message_size=LIMIT)
                )
                taken = 0
                while taken < size + size // 2:  # a result and a half, in chunks
                    message, buffers = await conn.recv()
                    assert isinstance(message, ResultChunk | JobResults), message
                    taken += sum(b.nbytes for b in buffers)
                    grown.append(private_memory(pid) - held)
                    if isinstance(message, ResultChunk) and message.index > 0:
                        kinds.add(message.kind)
            finally:
                conn.close()
            return grown

        kinds: set[str] = set()
        grown = asyncio.run(read_a_little())
        # The node kept what the result's buffer is: the client builds the bytes
        # object in place (no bytearray copied into bytes: one copy, not two).
        assert kinds == {"b"}
        assert max(grown) < size, [f"{g / MiB:.1f} MiB" for g in grown]
        # Not collected: still kept, for this recover_jobs.
        assert len(kept_files(tmp_path / "node")) == len(specs)
        jobs = dispynb.recover_jobs(
            str(journal), timeout=30, secret=node.secret, max_message_size=LIMIT
        )
    got = {
        job.id: [type(job.result).__name__, len(job.result), sha256(job.result)]
        for job in jobs
    }
    assert got == {f"job-{n}": expected[n] for n in range(len(specs))}
    assert all(job.status == dispynb.DispyJob.Finished for job in jobs)


def test_recover_jobs_gets_a_streamed_result_whole(tmp_path: Path) -> None:
    """A result over the node's streaming threshold, of a job that ends after its
    client was SIGKILLed, is recovered whole with recover_jobs' default limits."""
    from nodeserver.computation import STREAM_BYTES

    specs = [f"bytes:{STREAM_BYTES + 4096}"]  # the smallest that streams, and a little
    (tmp_path / "recover.py").write_text(RECOVER_KEPT)
    with running_node(tmp_path / "node", cpus=1) as node:
        journal, expected = kill_client_with_kept_results(tmp_path, node, specs)
        done = subprocess.run(
            [sys.executable, "recover.py", str(journal), node.secret,
             str(MAX_MESSAGE_SIZE)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["job-0", 11, expected[0], None]]
