"""One object for many jobs: ``JobCluster.put`` (dispynb.objects; issue 17, W7).

Real local node servers. "Crosses to each node once" is counted on the node side:
the bytes each node server's TCP connections received (the kernel's tcp_info, from
``ss``: the node's sockets are those on its listening port).
"""

from __future__ import annotations

import glob
import os
import pickle
import time

import pytest

from dispynb import DispyJob, JobCluster, LocalCluster, objects
from dispynb.errors import ClusterError, SerializationError
from dispynb.objects import ObjectRef
from tests.jobs import wait_until
from tests.nodeproc import ROOT

pytestmark = pytest.mark.slow

MB = 1_000_000


def measure(data: bytes, i: int) -> tuple[int, int, int]:
    import os

    return len(data), data[i], os.getpid()


def nested(box: dict[str, list[bytes]], i: int) -> int:
    return len(box["items"][0]) + i


def node_received(cluster: JobCluster) -> dict[str, int]:
    """Bytes sent so far to each node, by name (``DispyNode.tx``, counted on the
    connections as of its last job done): over a Unix socket for a LocalCluster's
    node, where no TCP counter sees them. A node not ready yet is missing."""
    return {node.name: node.tx for node in cluster.status().nodes}


def stored(local: LocalCluster, digest: str) -> list[str]:
    return glob.glob(os.path.join(local._dir, "node-*", ".store", digest))


def test_a_put_object_crosses_to_each_node_once_and_is_freed_at_close():
    data = os.urandom(8 * MB)
    with LocalCluster(nodes=2, cpus=1) as local:
        with JobCluster(measure, nodes=local) as cluster:
            assert cluster.submit(b"warm", 0)()[0] == 4  # set up on both nodes
            before = node_received(cluster)
            ref = cluster.put(data)
            assert isinstance(ref, ObjectRef) and ref.size > len(data)
            jobs = [cluster.submit(ref, i) for i in range(40)]
            results = [job() for job in jobs]
            assert {job.status for job in jobs} == {DispyJob.Finished}
            assert [r[:2] for r in results] == [(len(data), data[i]) for i in range(40)]
            after = node_received(cluster)
            assert len(after) == 2
            read = [sent - before.get(name, 0) for name, sent in after.items()]
            workers = {r[2] for r in results}
            assert len(stored(local, ref.digest)) == 2  # both nodes were used
        # Each node received the object once (plus small messages), not per job.
        assert all(ref.size <= n < 2 * ref.size for n in read), (read, ref.size)
        assert len(workers) >= 2
        wait_until(lambda: not stored(local, ref.digest))  # gone from the nodes
    assert not os.path.exists(ref.file.path)  # and from the client


def test_a_handle_inside_other_arguments_and_in_a_result(local):
    with JobCluster(nested, nodes=local) as cluster:
        ref = cluster.put([b"x" * 3 * MB])
        assert cluster.submit({"items": ref}, 5)() == 3 * MB + 5
    with JobCluster(identity, nodes=local) as cluster:
        ref = cluster.put({"a": 1})
        assert cluster.submit(ref)() == {"a": 1}  # the object itself comes back


def identity(value: object) -> object:
    return value


def test_a_handle_from_another_cluster_or_a_closed_one_is_refused(local):
    with JobCluster(identity, nodes=local) as first:
        ref = first.put(b"abc")
        with (
            JobCluster(identity, nodes=local) as second,
            pytest.raises(ClusterError, match="put it in this one"),
        ):
            second.submit(ref)
    with pytest.raises(ClusterError, match="closed"):
        first.put(b"later")


def test_an_unpicklable_object_is_refused_at_put(local):
    import threading

    with (
        JobCluster(identity, nodes=local) as cluster,
        pytest.raises(SerializationError, match="lock"),
    ):
        cluster.put(threading.Lock())


def test_the_handle_pickles_as_a_reference_not_the_object(local):
    with JobCluster(identity, nodes=local) as cluster:
        ref = cluster.put(b"y" * MB)
        assert len(pickle.dumps(ref)) < 200


def test_two_clusters_putting_the_same_object_on_one_node_share_it_safely():
    # The node keeps an object once by digest: the first cluster to close must not
    # take it from the other, which still submits jobs that use it.
    data = os.urandom(2 * MB)
    with LocalCluster(nodes=1, cpus=2) as local:
        first = JobCluster(measure, nodes=local)
        try:
            with JobCluster(measure, nodes=local) as second:
                ref1, ref2 = first.put(data), second.put(data)
                assert ref1.digest == ref2.digest
                assert first.submit(ref1, 1)()[:2] == (len(data), data[1])
                assert second.submit(ref2, 2)()[:2] == (len(data), data[2])
                first.close()
                assert len(stored(local, ref2.digest)) == 1  # still the second's
                job = second.submit(ref2, 3)
                assert job()[:2] == (len(data), data[3]), job.exception
                assert job.status == DispyJob.Finished
        finally:
            first.close()
        wait_until(lambda: not stored(local, ref1.digest))  # the last one freed it


#: A client that puts an object, says where its file is, and waits to be killed.
_PUTS_AND_WAITS = """
import sys
from dispynb import JobCluster
cluster = JobCluster(len, nodes=[sys.argv[1]], secret=sys.argv[2])
print(cluster.put(b"x" * 1000).file.path, flush=True)
sys.stdin.read()
"""


def test_the_files_of_a_killed_client_are_removed_by_the_next_put(local, tmp_path):
    """A kernel killed (SIGKILL, the out-of-memory killer) never removed the files
    of its put objects: they stayed in the temporary directory for ever, large
    ones included. The next client's first put removes those of clients that are
    no more; a running client's are kept."""
    import signal
    import subprocess
    import sys

    with JobCluster(identity, nodes=local) as running:
        kept = os.path.dirname(running.put(b"kept").file.path)
        child = subprocess.Popen(
            [sys.executable, "-c", _PUTS_AND_WAITS, *local.node_specs(), local.secret],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=tmp_path,  # its recovery journal
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert child.stdout is not None and child.stdin is not None
        left = os.path.dirname(child.stdout.readline().decode().strip())
        child.kill()
        assert child.wait(30) == -signal.SIGKILL
        child.stdin.close()
        child.stdout.close()
        assert os.path.isdir(left) and os.listdir(left)
        with JobCluster(identity, nodes=local) as later:
            assert later.submit(later.put(b"later"))() == b"later"
            assert not os.path.exists(left)
            assert os.path.isdir(kept)


def test_a_running_clients_files_survive_a_change_of_the_clock(monkeypatch):
    """The sweep told a running client from a dead one by its start time on the
    wall clock, which moves when the clock is set (NTP, a virtual machine
    resumed): a running client's object files would then be removed under it."""
    import psutil

    mine = objects.make_directory()  # this process's: running
    try:
        wall_clock_start = psutil.Process.create_time
        monkeypatch.setattr(
            psutil.Process,
            "create_time",
            lambda self: wall_clock_start(self) + 5.0,  # the clock was set 5 s on
        )
        objects.remove_directory(objects.make_directory())  # another's first put
        assert os.path.isdir(mine)
    finally:
        objects.remove_directory(mine)


#: A client in a pid namespace of its own (a container sharing the temporary
#: directory): its first put, then it waits for a line on stdin.
_CLIENT_IN_NAMESPACE = """
import sys
import tempfile

tempfile.tempdir = sys.argv[1]
from dispynb import objects

path = objects.make_directory()
objects.write(b"theirs", path)
print(path, flush=True)
sys.stdin.readline()
"""


def _pid_namespaces() -> bool:
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], check=False)
    return done.returncode == 0


def test_clients_in_other_pid_namespaces_keep_their_files(tmp_path, monkeypatch):
    """The sweep told a dead client by its pid, which means another process (or
    none) in another pid namespace: a running client's object files were removed
    by the first put of a client in a container sharing the temporary directory,
    and by this side's. A live client's files are kept whatever namespace it is in;
    a killed one's still go at the next put."""
    import signal
    import subprocess
    import sys
    import tempfile

    if not _pid_namespaces():
        pytest.skip("needs root and unshare for a pid namespace")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no other client's
    mine = objects.make_directory()
    objects.write(b"mine", mine)
    client = subprocess.Popen(
        [
            "unshare", "-p", "-f", "--mount-proc", "--kill-child",
            sys.executable, "-c", _CLIENT_IN_NAMESPACE, str(tmp_path),
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdin is not None
        theirs = client.stdout.readline().decode().strip()
        assert os.path.isdir(theirs), "the client in the namespace put"
        assert os.path.isdir(mine), "its put removed this running client's files"
        objects.remove_directory(objects.make_directory())  # this side's next put
        assert os.path.isdir(theirs), "a put here removed the running client's files"
        with open(f"/proc/{client.pid}/task/{client.pid}/children") as children:
            (inside,) = (int(pid) for pid in children.read().split())
        os.kill(inside, signal.SIGKILL)
        assert client.wait(30) != 0  # unshare ends once it reaped it
        objects.remove_directory(objects.make_directory())
        assert not os.path.exists(theirs), "the killed client's files were kept"
    finally:
        client.kill()
        client.wait(30)
        for pipe in (client.stdin, client.stdout):
            if pipe is not None:
                pipe.close()
        objects.remove_directory(mine)


def array_size(array: object) -> int:
    return int(array.nbytes)  # type: ignore[attr-defined]


def test_the_same_large_argument_sent_again_and_again_hints_at_put(local, caplog):
    """``submit(big_array, i)`` in a loop sends the array with every job; nothing
    said that ``cluster.put`` sends it once. The third job with the same large
    object (by identity) logs the hint, once; new arrays of the same size do not."""
    numpy = pytest.importorskip("numpy")

    caplog.set_level("WARNING", logger="dispynb.cluster")
    with JobCluster(array_size, nodes=local) as cluster:
        fresh = [cluster.submit(numpy.zeros(2**20)) for _ in range(3)]
        assert [job() for job in fresh] == [2**23] * 3
        assert not caplog.records, caplog.text  # three arrays: each sent once
        big = numpy.zeros(2**20)
        same = [cluster.submit(big) for _ in range(5)]
        assert [job() for job in same] == [2**23] * 5
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "the same ndarray of 8 MiB went with 3 jobs: submit pickles and sends it "
        "again with each job. Send it once: ref = cluster.put(value), then "
        "submit(ref, ...) (each node gets it once; docs/howto/shared-objects.md). "
        "Said once"
    ], said


def hold(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_ctrl_c_while_submit_weighs_the_put_hint_leaves_no_job(local, monkeypatch):
    """A Ctrl-C (a SIGINT handler that raises) landing while ``submit`` weighs its
    hint at ``put``: ``submit`` raises KeyboardInterrupt and leaves no job behind.
    The hint was weighed after the job was registered: the user got no handle of a
    job that ran all the same, and ``cluster.wait()`` waited for it (the submit
    storm of tests/api/test_loop_place.py met it)."""

    def interrupted(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        raise KeyboardInterrupt

    with JobCluster(hold, nodes=local) as cluster:
        monkeypatch.setattr(cluster._repeats, "note", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cluster.submit(600)
        monkeypatch.undo()
        # Nothing to wait for: returns at once (a job left would hold it 600 s).
        assert cluster.wait(timeout=20) is True
        assert cluster.submit(0)() == 0
