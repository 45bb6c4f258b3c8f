"""Dependencies and files both ways, with real nodes."""

from __future__ import annotations

import os
import sys

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import ConfigurationError, SetupError
from tests.jobs import WAIT
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current directory for the client, as dispy programs assume one."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def read_file(name: str) -> str:
    with open(name) as handle:
        return handle.read()


def test_depends_file_lands_in_computation_directory(local, workdir):
    (workdir / "data").mkdir()
    (workdir / "data" / "input.txt").write_text("42\n")
    with JobCluster(read_file, nodes=local, depends=["data/input.txt"]) as cluster:
        job = cluster.submit("data/input.txt")
        assert job.wait(timeout=WAIT)
    assert job.status == DispyJob.Finished, job.exception
    assert job.result == "42\n"


def run_tool(name: str) -> str:
    import subprocess

    return subprocess.run(
        [f"./{name}"], capture_output=True, text=True, check=True
    ).stdout


def test_an_executable_in_depends_stays_executable_and_a_file_does_not(local, workdir):
    """As dispy's nodes keep a sent file's mode: a helper program given in
    ``depends`` runs as ``./tool.sh`` (it was not executable: PermissionError), and
    a file that was not executable is not made so."""
    tool = workdir / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    (workdir / "plain.txt").write_text("data\n")
    with JobCluster(run_tool, nodes=local, depends=["tool.sh", "plain.txt"]) as cluster:
        ran = cluster.submit("tool.sh")
        modes = cluster.submit("plain.txt")  # a program that is not one
        assert ran.wait(timeout=WAIT) and modes.wait(timeout=WAIT)
    assert ran.status == DispyJob.Finished, ran.exception
    assert ran.result == "tool ran\n"
    assert modes.status == DispyJob.Terminated
    assert "PermissionError" in modes.exception, modes.exception


def test_an_executable_sent_with_send_file_stays_executable(local, workdir):
    """``cluster.send_file`` keeps a program executable on the node too."""
    tool = workdir / "later.sh"
    tool.write_text("#!/bin/sh\necho sent later\n")
    tool.chmod(0o700)
    with JobCluster(run_tool, nodes=local) as cluster:
        assert cluster.send_file("later.sh", cluster.status().nodes[0]) == 0
        job = cluster.submit("later.sh")
        assert job.wait(timeout=WAIT)
    assert job.result == "sent later\n", job.exception


def test_a_jobs_own_program_stays_executable_and_its_own_file_does_not(local, workdir):
    """As ``depends``: a program given in ``dispy_job_depends`` runs as
    ``./job_tool.sh`` on the node (it arrived not executable: PermissionError),
    and a job's file that was not executable is not made so."""
    tool = workdir / "job_tool.sh"
    tool.write_text("#!/bin/sh\necho job tool ran\n")
    tool.chmod(0o755)
    (workdir / "job_plain.txt").write_text("data\n")
    with JobCluster(run_tool, nodes=local) as cluster:
        ran = cluster.submit("job_tool.sh", dispy_job_depends=["job_tool.sh"])
        plain = cluster.submit("job_plain.txt", dispy_job_depends=["job_plain.txt"])
        assert ran.wait(timeout=WAIT) and plain.wait(timeout=WAIT)
    assert ran.status == DispyJob.Finished, ran.exception
    assert ran.result == "job tool ran\n"
    assert plain.status == DispyJob.Terminated
    assert "PermissionError" in plain.exception, plain.exception


def test_depends_module_is_importable_on_node(local, workdir, monkeypatch):
    (workdir / "shapes_dep.py").write_text("def area(w, h):\n    return w * h\n")
    monkeypatch.syspath_prepend(str(workdir))
    import shapes_dep

    def compute(w: int) -> int:
        import shapes_dep as module  # imported on the node, from the sent file

        return module.area(w, 2)

    try:
        with JobCluster(compute, nodes=local, depends=[shapes_dep]) as cluster:
            job = cluster.submit(5)
            assert job.wait(timeout=WAIT)
        assert job.status == DispyJob.Finished, job.exception
        assert job.result == 10
    finally:
        sys.modules.pop("shapes_dep", None)


def test_depends_function_class_and_instance_are_named_in_globals(local, workdir):
    def helper(x: int) -> int:
        return x + 1

    class Box:
        size = 3

    class Marker:
        pass

    def compute(x: int) -> tuple[int, int, str]:
        # Looked up by name only (dispy puts depends in the computation's namespace).
        names = globals()
        return names["helper"](x), names["Box"].size, names["Marker"].__name__

    depends = [helper, Box, Marker()]
    with JobCluster(compute, nodes=local, depends=depends) as cluster:
        job = cluster.submit(1)
        assert job.wait(timeout=WAIT)
    assert job.status == DispyJob.Finished, job.exception
    assert job.result == (2, 3, "Marker")


def test_depends_not_a_dependency_gives_clear_error(local):
    with pytest.raises(ConfigurationError, match=r"depends\[0\]"):
        JobCluster(read_file, nodes=local, depends=[42])


def test_job_depends_file_present_for_its_job_only(local1, workdir):
    (workdir / "extra.txt").write_text("for one job")

    def compute(_: int) -> bool:
        return os.path.exists("extra.txt")

    with JobCluster(compute, nodes=local1) as cluster:
        with_file = cluster.submit(1, dispy_job_depends=["extra.txt"])
        assert with_file.wait(timeout=WAIT)
        without = cluster.submit(2)
        assert without.wait(timeout=WAIT)
    assert with_file.result is True, with_file.exception
    assert without.result is False


def test_a_file_both_in_depends_and_a_jobs_depends(local1, workdir):
    """A file the cluster's depends already placed, given again with a job's
    dispy_job_depends (a veteran's habit): every such job runs, the job sees no
    temporary file beside it, and the file stays for the cluster's later jobs, as
    dispy counts a file's users. Before, placing it again left a hidden temporary
    file that failed the next job with "File exists", and the job's end removed
    the cluster's file."""
    (workdir / "shared.txt").write_text("for every job")

    def compute(_: int) -> tuple[str, list[str]]:
        return read_file("shared.txt"), sorted(os.listdir("."))

    with JobCluster(compute, nodes=local1, depends=["shared.txt", read_file]) as c:
        again = [c.submit(n, dispy_job_depends=["shared.txt"]) for n in range(3)]
        assert all(job.wait(timeout=WAIT) for job in again)
        later = c.submit(3)
        assert later.wait(timeout=WAIT)
    for job in [*again, later]:
        assert job.status == DispyJob.Finished, job.exception
        assert job.result == ("for every job", ["shared.txt"])


def test_job_depends_function_for_its_job_only(local1):
    def tool() -> str:
        return "tool"

    def compute(_: int) -> str:
        names = globals()
        return names["tool"]() if "tool" in names else "absent"

    with JobCluster(compute, nodes=local1) as cluster:
        first = cluster.submit(1, dispy_job_depends=[tool])
        assert first.wait(timeout=WAIT)
        second = cluster.submit(2)
        assert second.wait(timeout=WAIT)
    assert (first.result, second.result) == ("tool", "absent")


def test_same_file_for_second_computation_is_not_sent_again(local, workdir):
    (workdir / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))

    def size(name: str) -> int:
        return os.path.getsize(name)

    sent = []
    for _ in range(2):
        with JobCluster(size, nodes=local, depends=["big.bin"]) as cluster:
            assert cluster.submit("big.bin")() == 2 * 1024 * 1024
            cluster.print_status()  # refreshes the traffic counters
            sent.append(cluster.status().nodes[0].tx)
    assert sent[0] > 2 * 1024 * 1024
    assert sent[1] < 256 * 1024  # the node kept it by content


def test_dispy_send_file_saves_under_files_dir_at_relative_path(local, workdir):
    received = workdir / "received"
    received.mkdir()

    def compute(n: int) -> int:
        os.makedirs("out", exist_ok=True)
        with open(f"out/result{n}.txt", "w") as handle:
            handle.write(f"result {n}")
        return dispy_send_file(f"out/result{n}.txt")  # type: ignore[name-defined]  # noqa: F821

    with JobCluster(compute, nodes=local, files_dir=str(received)) as cluster:
        jobs = [cluster.submit(n) for n in range(3)]
        assert cluster.wait(timeout=WAIT)
    assert [job.result for job in jobs] == [0, 0, 0]
    for n in range(3):
        assert (received / "out" / f"result{n}.txt").read_text() == f"result {n}"


def test_dispy_send_file_outside_job_dir_uses_base_name(
    local, workdir, tmp_path_factory
):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "report.txt"
    elsewhere.write_text("from elsewhere")

    def compute(path: str) -> int:
        return dispy_send_file(path)  # type: ignore[name-defined]  # noqa: F821

    with JobCluster(compute, nodes=local) as cluster:
        job = cluster.submit(str(elsewhere))
        assert job.wait(timeout=WAIT)
    assert job.result == 0
    assert (workdir / "report.txt").read_text() == "from elsewhere"


def test_files_over_max_file_size_are_refused_both_ways(tmp_path, workdir):
    (workdir / "big.txt").write_text("x" * 5000)
    (workdir / "small.txt").write_text("ok")

    def compute(n: int) -> int:
        with open("made.txt", "w") as handle:
            handle.write("y" * n)
        return dispy_send_file("made.txt")  # type: ignore[name-defined]  # noqa: F821

    with running_node(tmp_path / "node", "--max-file-size", "1000") as node:
        with JobCluster(compute, nodes=[node.spec], secret=node.secret) as cluster:
            assert cluster.submit(10)() == 0
            assert cluster.submit(5000)() == -1  # dispy_send_file refuses it
            target = cluster.status().nodes[0]
            assert cluster.send_file("small.txt", target) == 0
            assert cluster.send_file("big.txt", target) == -1
        with pytest.raises(SetupError, match="maximum file size"):
            JobCluster(
                compute, nodes=[node.spec], secret=node.secret, depends=["big.txt"]
            )


def test_send_file_of_a_missing_file_returns_minus_one_saying_why_once(
    local1, workdir, caplog
):
    """dispy's -1, and one warning naming the file, its words said once (before:
    "send_file: send_file: 'nope.txt' is not a file")."""
    with JobCluster(read_file, nodes=local1) as cluster:
        assert cluster.send_file("nope.txt", cluster.status().nodes[0]) == -1
    warnings = [r.getMessage() for r in caplog.records if "nope.txt" in r.getMessage()]
    assert warnings == ["send_file: 'nope.txt' is not a file"]


def file_sha256(name: str) -> str:
    import hashlib

    with open(name, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def test_big_files_are_read_off_the_io_loop_and_arrive_intact(
    local1, workdir, monkeypatch
):
    """depends files, a job's own file and send_file: each is read (and checked
    against its digest) on a worker thread, never on the I/O loop, and the jobs
    that need it find it whole."""
    import hashlib
    import threading

    from dispynb.depends import FileRef

    contents = {
        name: os.urandom(size)
        for name, size in [
            ("setup.bin", 24 * 1024 * 1024),
            ("job.bin", 9 * 1024 * 1024 + 7),
            ("sent.bin", 5 * 1024 * 1024 + 1),
        ]
    }
    for name, data in contents.items():
        (workdir / name).write_bytes(data)
    readers: list[str] = []
    read = FileRef.read

    def recording_read(self: FileRef) -> bytes:
        readers.append(threading.current_thread().name)
        return read(self)

    monkeypatch.setattr(FileRef, "read", recording_read)
    with JobCluster(file_sha256, nodes=local1, depends=["setup.bin"]) as cluster:
        assert (
            cluster.submit("setup.bin")()
            == hashlib.sha256(contents["setup.bin"]).hexdigest()
        )
        job = cluster.submit("job.bin", dispy_job_depends=["job.bin"])
        assert job() == hashlib.sha256(contents["job.bin"]).hexdigest(), job.exception
        node = cluster.status().nodes[0]
        assert cluster.send_file("sent.bin", node) == 0
        assert (
            cluster.submit("sent.bin")()
            == hashlib.sha256(contents["sent.bin"]).hexdigest()
        )
    assert len(readers) == 3
    assert "dispynb-io" not in readers, readers
