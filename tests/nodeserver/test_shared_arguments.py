"""Large arguments sent over the socket reach the worker as the node's memfd.

Real node servers (`LocalCluster`) with the client's shared memory turned off
(``DISPYNB_SHARED_MEMORY=0``, as for a node on another host): the node server
receives each large message into a memfd (`nodeserver.sharedbody`) and passes it to
the worker with SCM_RIGHTS; the job sees the mapping in its own ``/proc/self/maps``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from dispynb.protocol.messages import JobCancel
from tests.asyncutil import run
from tests.jobs import WAIT, is_computation_process, wait_until
from tests.transport.util import RawClient, read_until_closed

pytestmark = pytest.mark.slow

MB = 1_000_000


@pytest.fixture(scope="module")
def node() -> Iterator[LocalCluster]:
    """One local node with 1 CPU, every large argument through its socket."""
    saved = os.environ.get("DISPYNB_SHARED_MEMORY")
    os.environ["DISPYNB_SHARED_MEMORY"] = "0"
    try:
        with LocalCluster(cpus=1) as cluster:
            yield cluster
    finally:
        if saved is None:
            del os.environ["DISPYNB_SHARED_MEMORY"]
        else:
            os.environ["DISPYNB_SHARED_MEMORY"] = saved


def mapped_digest(data: bytes) -> tuple[int, str, bool, str]:
    """Length and digest of ``data``, whether the job's process maps a body of the
    node's (the arguments' memfd), and the argument's type."""
    import hashlib

    with open("/proc/self/maps") as maps:
        mapped = "memfd:dispynb-body" in maps.read()
    return len(data), hashlib.sha256(data).hexdigest(), mapped, type(data).__name__


def mapped_now(_: object = None) -> bool:
    """Whether this worker still maps a body (after an earlier job ended)."""
    with open("/proc/self/maps") as maps:
        return "memfd:dispynb-body" in maps.read()


def node_bodies(cluster: LocalCluster) -> int:
    """Memfd bodies the node server holds open."""
    count = 0
    for pid in cluster.pids:
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            try:
                count += "memfd:dispynb-body" in os.readlink(entry)
            except OSError:
                continue
    return count


def workers_mapping_bodies(cluster: LocalCluster) -> list[int]:
    """The node's computation processes and workers that map a body."""
    found = []
    for pid in cluster.pids:
        for proc in psutil.Process(pid).children(recursive=True):
            if not is_computation_process(proc):
                continue
            try:
                maps = Path(f"/proc/{proc.pid}/maps").read_text()
            except OSError:
                continue
            if "memfd:dispynb-body" in maps:
                found.append(proc.pid)
    return found


def test_a_large_argument_arrives_mapped_intact_and_is_let_go_after_the_job(node):
    payloads = [os.urandom(10 * MB) for _ in range(2)] + [os.urandom(3 * MB)]
    with JobCluster(mapped_digest, nodes=node) as cluster:
        jobs = [cluster.submit(p) for p in payloads]
        results = [job() for job in jobs]
        assert all(job.status == DispyJob.Finished for job in jobs)
        assert results == [
            (len(p), hashlib.sha256(p).hexdigest(), True, "bytes") for p in payloads
        ]
        small = cluster.submit(b"x")()
        # (whether it maps a body: the worker keeps the last one mapped for the
        # body's next job, until it is idle)
        length, digest, _mapped, kind = small
        assert (length, digest, kind) == (1, hashlib.sha256(b"x").hexdigest(), "bytes")
        # An idle worker unmaps the bodies it kept.
        wait_until(lambda: not workers_mapping_bodies(node))
    with JobCluster(mapped_now, nodes=node) as cluster:
        assert cluster.submit(None)() is False  # the worker unmapped it
    # The node keeps a bounded pool while a client is connected, none after.
    wait_until(lambda: node_bodies(node) == 0)


def hold_argument(data: bytearray) -> list[str]:
    """Keep the argument alive in the worker's globals (as a cache would); the
    digests of all kept so far."""
    import hashlib

    held = globals().setdefault("_held", [])
    held.append(data)
    return [hashlib.sha256(item).hexdigest() for item in held]


def test_an_argument_the_job_keeps_is_not_changed_by_the_next_ones(node):
    payloads = [bytearray(os.urandom(4 * MB)) for _ in range(3)]
    digests = [hashlib.sha256(p).hexdigest() for p in payloads]
    with JobCluster(hold_argument, nodes=node) as cluster:
        results = [cluster.submit(p)() for p in payloads]
    # One worker (1 CPU): each job sees every earlier argument unchanged.
    assert results == [digests[:1], digests[:2], digests]


def crash_on_large(data: bytes) -> int:
    if len(data) > 1000:
        os._exit(3)
    return len(data)


def test_a_worker_dying_with_a_mapped_argument_crashes_only_its_job(node):
    payload = os.urandom(5 * MB)
    with JobCluster(crash_on_large, nodes=node) as cluster:
        crashed = cluster.submit(payload)
        assert crashed.wait(timeout=WAIT)
        assert crashed.status == DispyJob.Terminated
        assert "exited with status 3" in (crashed.exception or "")
        assert cluster.submit(b"ok")() == 2
        assert cluster.submit(b"y" * 2000)  # runs (and crashes) in a new worker
    assert all(psutil.pid_exists(pid) for pid in node.pids)


def test_a_large_frame_with_a_wrong_mac_is_refused_and_its_body_let_go(node):
    """A client's large frame lands in a memfd body as it arrives (in pieces of
    `READ_LOWAT`, hashed as they come); one byte changed in it makes the node close
    the connection, decoding nothing, and the body goes with the others once the
    node is idle; the node serves the next client as before."""
    host, port = node.addresses[0]
    data = bytearray(os.urandom(3 * MB))

    async def tamper() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            raw = RawClient(reader, writer)
            await raw.handshake(node.secret.encode())
            frame = raw.signed_frame(JobCancel(comp_id=1, key=1, attempt=0), [data])
            flipped = bytearray(frame)
            flipped[len(flipped) // 2] ^= 1
            writer.write(flipped)
            await read_until_closed(reader)
        finally:
            writer.close()

    run(tamper())
    wait_until(lambda: node_bodies(node) == 0)
    with JobCluster(mapped_digest, nodes=node) as cluster:
        got = cluster.submit(bytes(data))()
    assert got == (len(data), hashlib.sha256(data).hexdigest(), True, "bytes")


def test_a_client_that_hangs_up_mid_frame_leaves_no_body_behind(node):
    """A client stops half-way through a large frame and hangs up: the body the node
    was receiving it into (a memfd, hashed piece by piece as it came) is let go with
    the connection, nothing of it is decoded, and the node serves the next client."""
    host, port = node.addresses[0]
    data = os.urandom(3 * MB)
    wait_until(lambda: node_bodies(node) == 0)

    async def stop_half_way() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            raw = RawClient(reader, writer)
            await raw.handshake(node.secret.encode())
            frame = raw.signed_frame(JobCancel(comp_id=1, key=1, attempt=0), [data])
            writer.write(frame[: len(frame) // 2])
            await writer.drain()
            # The node took a body for the frame once its prefix arrived.
            deadline = asyncio.get_running_loop().time() + WAIT
            while node_bodies(node) == 0:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
        finally:
            writer.close()

    run(stop_half_way())
    wait_until(lambda: node_bodies(node) == 0)
    with JobCluster(mapped_digest, nodes=node) as cluster:
        got = cluster.submit(data)()
    assert got == (len(data), hashlib.sha256(data).hexdigest(), True, "bytes")
