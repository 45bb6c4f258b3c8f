"""End-to-end tests of `LocalCluster`: real nodes on 127.0.0.1, and no leftovers.

Each test starts its own nodes (it stops them, or checks processes), so none uses the
shared fixtures of conftest.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

import dispynb.local
from dispynb import DispyJob, JobCluster, LocalCluster
from dispynb.errors import ClusterError, ConfigurationError
from dispynb.local import _NODE_MAIN
from dispynb.transport import localsockets
from tests import jobs
from tests.jobs import WAIT, wait_until

pytestmark = pytest.mark.slow


def node_name(_: object = None) -> str:
    """The name of the node running the job (dispy's ``dispy_node_name`` global)."""
    return globals()["dispy_node_name"]


def test_local_cluster_start_and_close_leaves_no_processes():
    local = LocalCluster(cpus=2)
    try:
        nodes = [psutil.Process(pid) for pid in local.pids]
        assert len(nodes) == 1
        assert all(node.is_running() for node in nodes)
        # Dispynb's own node, its stop signals held from the start (`_NODE_MAIN`).
        assert nodes[0].cmdline()[1:4] == ["-P", "-c", _NODE_MAIN]
        with JobCluster(jobs.mark_and_sleep, nodes=local) as cluster:
            # While a computation is set up: its process and 2 workers run.
            wait_until(lambda: len(jobs.computation_processes(nodes[0])) >= 3)
            descendants = nodes[0].children(recursive=True)
            assert cluster.submit(None, 0).wait(timeout=WAIT)
    finally:
        local.close()
    _gone, alive = psutil.wait_procs([*nodes, *descendants], timeout=WAIT)
    assert alive == []
    assert not any(psutil.pid_exists(pid) for pid in local.pids)
    assert local.pids == []


@pytest.mark.parametrize("module", ["nodeserver.cli", "nodeserver.rehearsal"])
def test_local_cluster_node_stopped_while_it_imports_stops_cleanly(tmp_path, module):
    """A `LocalCluster` closed as it starts sends SIGTERM to nodes still importing
    their modules: they died of the signal's default action. They now stop cleanly
    (status 0), and silently: their stderr is the notebook's, where Stop pressed
    during ``%dispy local`` showed 'dispynb-node: stopped by SIGTERM while
    starting' once per node above the cell's own line. Here the node's program
    signals itself as it imports ``module``: before its entry point runs, then in
    it (its own hold of the signals)."""
    stop_on_import = (
        "import os, signal, sys\n"
        "class Stop:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        f"        if name == {module!r}:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Stop)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(dispynb.local.__file__)))
    options = ["--host", "127.0.0.1", "--port", "0", "--dest-path", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-c", stop_on_import + _NODE_MAIN, root, *options],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_local_cluster_node_specs_name_listening_nodes_with_secret():
    with LocalCluster(cpus=1) as local:
        assert local.node_specs() == [
            f"127.0.0.1:{port}" for _, port in local.addresses
        ]
        ((host, port),) = local.addresses
        assert host == "127.0.0.1" and port > 0
        listening = {
            conn.laddr
            for conn in psutil.Process(local.pids[0]).net_connections("tcp")
            if conn.status == psutil.CONN_LISTEN
        }
        assert (host, port) in listening
        with JobCluster(
            jobs.square, nodes=local.node_specs(), secret=local.secret
        ) as cluster:
            assert cluster.submit(12)() == 144


def test_local_cluster_secret_is_random_and_not_on_command_line():
    with LocalCluster(cpus=1) as first, LocalCluster(cpus=1) as second:
        assert first.secret != second.secret
        assert len(first.secret) >= 32
        for local in (first, second):
            argv = " ".join(psutil.Process(local.pids[0]).cmdline())
            assert local.secret not in argv


def test_local_cluster_two_nodes_both_run_jobs():
    with LocalCluster(nodes=2, cpus=1) as local:
        assert len(local.pids) == len(set(local.pids)) == 2
        specs = local.node_specs()
        assert len(set(specs)) == 2
        with JobCluster(node_name, nodes=local) as cluster:
            wait_until(lambda: len(cluster.status().nodes) == 2)
            assert sorted(node.name for node in cluster.status().nodes) == [
                "local-0",
                "local-1",
            ]
            submitted = [cluster.submit(i) for i in range(20)]
            assert cluster.wait(timeout=WAIT)
    assert {job.status for job in submitted} == {DispyJob.Finished}
    assert {job.result for job in submitted} == {"local-0", "local-1"}


def test_local_cluster_outlives_the_job_clusters_on_it():
    """Its nodes stop when it closes, not with a `JobCluster` (choose-engine.md):
    a second cluster runs on them."""
    with LocalCluster(cpus=1) as local:
        for n in (2, 3):
            with JobCluster(jobs.square, nodes=local) as cluster:
                assert cluster.submit(n)() == n * n
            assert all(psutil.pid_exists(pid) for pid in local.pids)
        pids = local.pids
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_closing_the_local_cluster_first_ends_the_jobs_of_a_cluster_on_it(
    tmp_path, caplog
):
    """A LocalCluster closed while a cluster still runs jobs on it (closed out of
    order) closes that cluster first: its running job is terminated, its queued
    ones cancelled, and one warning says so. Before, the nodes were stopped under
    it and job() of a queued job waited for ever (Created: no node would come)."""
    local = LocalCluster(cpus=1)
    cluster = JobCluster(jobs.mark_and_sleep, nodes=local)
    running = cluster.submit(str(tmp_path / "started"), 60)
    queued = [cluster.submit(None, 60) for _ in range(2)]
    jobs.wait_for_path(tmp_path / "started")
    local.close()
    assert running.finish.wait(WAIT) and running.status == DispyJob.Terminated
    for job in queued:
        assert job.finish.wait(WAIT) and job.status == DispyJob.Cancelled
    with pytest.raises(ClusterError, match="closed"):
        cluster.submit(None, 0)
    warnings = [
        r.getMessage() for r in caplog.records if "LocalCluster" in r.getMessage()
    ]
    assert (
        len(warnings) == 1 and "closed before cluster 'mark_and_sleep'" in warnings[0]
    )


def test_closing_the_local_cluster_after_a_clusters_jobs_ended_warns_of_nothing(
    caplog,
):
    """A notebook's `JobCluster` left open, its jobs all done, when the cell at the
    end closes the LocalCluster: the cluster is closed without the warning that
    its jobs not done are cancelled (there were none; it showed in red in the
    cell)."""
    local = LocalCluster(cpus=1)
    cluster = JobCluster(jobs.square, nodes=local)
    assert cluster.submit(3)() == 9
    local.close()
    with pytest.raises(ClusterError, match="closed"):
        cluster.submit(2)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not said, said


def test_local_cluster_close_twice_is_harmless():
    """A second close (atexit, a with block's end after close()) lets go of
    nothing more: the port may be a newer LocalCluster's node's by then, and its
    socket stays registered (the second close unregistered it)."""
    local = LocalCluster(cpus=1)
    pids = local.pids
    ((host, port),) = local.addresses
    local.close()
    newer = os.path.join(tempfile.gettempdir(), "newer-local-cluster", "node-0.sock")
    localsockets.register(host, port, newer)
    try:
        local.close()
        assert localsockets.path_for(host, port) == newer
    finally:
        localsockets.unregister(host, port)
    assert not any(psutil.pid_exists(pid) for pid in pids)


AFTER_THE_BLOCK = """
from dispynb import JobCluster, LocalCluster


def compute(n):
    return n * n


if __name__ == "__main__":
    with LocalCluster(cpus=1) as local:
        pass
    cluster = JobCluster(compute, nodes=local)  # one indentation short
"""


def test_a_job_cluster_made_after_the_local_clusters_block_says_so(tmp_path):
    """The README's two-context ``with`` written as two blocks, the JobCluster one
    level too far left: the script ended with "cannot connect to 127.0.0.1:PORT:
    nothing listens on port PORT there ...; is dispynb-node running there?"."""
    script = tmp_path / "script.py"
    script.write_text(AFTER_THE_BLOCK)
    done = subprocess.run(
        [sys.executable, str(script)],
        env={k: v for k, v in os.environ.items() if not k.startswith("DISPYNB_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "dispynb.errors.ClusterError: this LocalCluster is closed (its with block "
        "has ended, or close() was called): its nodes are stopped. Make the "
        "JobCluster inside the LocalCluster's with block, or start a new "
        "LocalCluster"
    ), done.stderr


def test_local_cluster_context_manager_stops_nodes_on_exception():
    with pytest.raises(RuntimeError, match="inside"), LocalCluster(cpus=1) as local:
        pids = local.pids
        raise RuntimeError("inside the with block")
    assert not any(psutil.pid_exists(pid) for pid in pids)


def outlast_sigterm(marker: str) -> int:
    """A job that writes its pid to ``marker``, notes (``marker`` + ".term") the
    SIGTERM its node's shutdown sends it and sleeps on: the node waits for it
    before it kills it."""
    import pathlib
    import signal
    import time

    def noted(signum: int, frame: object) -> None:
        pathlib.Path(marker + ".term").write_text("got it")

    signal.signal(signal.SIGTERM, noted)
    pathlib.Path(marker + ".tmp").write_text(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getpid()


def test_local_cluster_close_interrupted_ends_its_nodes_at_once(tmp_path):
    """Stop (Ctrl-C) while `LocalCluster.close` waits for its nodes to stop (Stop
    pressed twice while ``%dispy local`` starts, the first one's cleanup being
    that close; or while ``%dispy close`` runs): the KeyboardInterrupt cut the
    close short, and the node, once it had stopped its job, stayed a zombie child
    (or ran on) with its directory until the program ended. Now the close kills
    and reaps the nodes left, lets their directory go, then raises."""
    from tests.sigint import sigint_when

    marker = str(tmp_path / "job")
    local = LocalCluster(nodes=1, cpus=1)
    (node,) = local.pids
    directory = local._dir
    # Not nodes=local: close() would cancel its job first, not the node's shutdown.
    cluster = JobCluster(outlast_sigterm, nodes=local.node_specs(), secret=local.secret)
    try:
        cluster.submit(marker)
        jobs.wait_for_path(marker)
        worker = int(Path(marker).read_text())
        with (
            sigint_when(lambda: os.path.exists(marker + ".term")),
            pytest.raises(KeyboardInterrupt),
        ):
            local.close()
        assert not psutil.pid_exists(node)  # ended and reaped: no zombie
        assert not os.path.exists(directory)
        assert local.pids == []
        _gone, alive = psutil.wait_procs(_processes([worker]), timeout=WAIT)
        assert alive == []  # the job's worker went with its node
    finally:
        cluster.close(terminate=True)
        local.close()


def _processes(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(pid))
    return found


def test_local_cluster_node_fails_to_start_raises_cluster_error():
    # An option the node rejects: it exits with status 2 before listening.
    with pytest.raises(ClusterError, match="exited with status 2"):
        LocalCluster(cpus=1, loglevel="chatty")


def test_local_cluster_zero_nodes_raises_configuration_error():
    with pytest.raises(ConfigurationError, match="nodes must be a whole number, at"):
        LocalCluster(nodes=0)


@pytest.mark.parametrize(
    ("arguments", "wrong"),
    [
        ({"nodes": "2"}, "nodes must be a whole number, at least 1 .*got '2'"),
        ({"nodes": 1.5}, "nodes must be a whole number, at least 1 .*got 1.5"),
        ({"nodes": True}, "nodes must be a whole number, at least 1 .*got True"),
        ({"cpus": "4"}, "cpus must be a whole number, at least 1 .*got '4'"),
        ({"cpus": 2.0}, "cpus must be a whole number, at least 1 .*got 2.0"),
        ({"cpus": 0}, "cpus must be a whole number, at least 1 .*got 0"),
        ({"nodes": "2", "cpus": 1}, "nodes must be .*got '2'"),
    ],
)
def test_local_cluster_wrong_arguments_say_what_is_expected(arguments, wrong):
    """Before: nodes="2" raised a bare TypeError from a comparison inside."""
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(ConfigurationError, match=f"^LocalCluster's {wrong}$"):
        LocalCluster(**arguments)
    # Refused before anything started: no node directory left behind.
    after = set(os.listdir(tempfile.gettempdir()))
    assert not {name for name in after - before if name.startswith("dispynb-local-")}


def test_more_cpus_than_the_machine_has_are_taken_with_a_warning_naming_its_count(
    caplog,
):
    """Before: accepted silently. dispynb-node takes them (its jobs share the
    CPUs), so LocalCluster does too, and says how many the machine has."""
    available = os.cpu_count() or 1
    asked = available + 3
    with (
        caplog.at_level(logging.WARNING, logger="dispynb"),
        LocalCluster(cpus=asked) as local,
        JobCluster(jobs.square, nodes=local) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 1)
        assert cluster.status().nodes[0].cpus == asked
    warned = [r.getMessage() for r in caplog.records if r.name == "dispynb.local"]
    machine = f"{available} CPU" + ("" if available == 1 else "s")
    assert warned == [
        f"LocalCluster(cpus={asked}): this machine has {machine}; each node runs up "
        f"to {asked} jobs at once, which share them (leave out cpus= to share the "
        "machine's CPUs among the nodes)"
    ]


def test_cpus_within_the_machine_warn_of_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="dispynb"), LocalCluster(cpus=1):
        pass
    assert not [r for r in caplog.records if r.name == "dispynb.local"]


def test_local_cluster_default_cpus_share_this_machine():
    with LocalCluster() as local:
        assert local.cpus == max(os.cpu_count() or 1, 1)
        with JobCluster(jobs.square, nodes=local) as cluster:
            assert cluster.status().nodes[0].cpus == local.cpus


def test_local_cluster_secret_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # DISPYNB_SECRET is for named nodes; a LocalCluster's nodes know only its own.
    monkeypatch.setenv("DISPYNB_SECRET", "a-secret-for-other-nodes")
    with LocalCluster(cpus=1) as local, JobCluster(jobs.square, nodes=local) as cluster:
        assert cluster.submit(7)() == 49


#: A process whose main thread ends first (a zombie that ``waitpid`` cannot collect
#: yet, as a killed node is while its other threads end); the other thread ends the
#: process with status 7 once the file named by argv[1] exists.
_MAIN_THREAD_ENDS_FIRST = """
import ctypes, os, sys, threading, time

def end_later():
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.005)
    os._exit(7)

threading.Thread(target=end_later).start()
ctypes.CDLL(None).syscall(60, 0)  # SYS_exit (x86_64): this thread only
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="SYS_exit is 60 on x86_64")
def test_a_node_whose_main_thread_has_ended_counts_as_exited(tmp_path):
    """What a SIGKILLed node looks like for a moment: a zombie still collecting its
    threads. `exited()` says it has exited (waiting for its status), where `poll()`
    alone said it runs."""
    import subprocess
    import sys

    from dispynb.local import _exit_status

    release = tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", _MAIN_THREAD_ENDS_FIRST, release])
    try:
        wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
        assert proc.poll() is None  # what exited() relied on: "still running"

        waited = proc.wait

        def wait_after_release(timeout: float | None = None) -> int:
            release.write_text("go")  # the other thread ends once exited() waits
            return waited(timeout)

        proc.wait = wait_after_release  # type: ignore[method-assign]
        assert _exit_status(proc) == 7
    finally:
        release.write_text("go")
        proc.wait(WAIT)


def _tcp_links_to(port: int) -> list[object]:
    """This process's TCP connections to ``port``."""
    return [
        conn
        for conn in psutil.Process().net_connections("tcp")
        if conn.raddr and conn.raddr[1] == port
    ]


def test_local_cluster_client_reaches_its_node_over_a_private_unix_socket():
    """Loopback TCP costs more per message than a Unix socket (issue 17, W2): the
    client connects to its own LocalCluster's node through a socket in the
    cluster's private directory, not over TCP."""
    with LocalCluster(cpus=1) as local:
        ((host, port),) = local.addresses
        path = os.path.join(local._dir, "node-0.sock")
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(local._dir).st_mode) == 0o700
        with JobCluster(jobs.square, nodes=local) as cluster:
            assert cluster.submit(7)() == 49
            assert _tcp_links_to(port) == []
        assert localsockets.path_for(host, port) == path
    assert localsockets.path_for(host, port) is None
    assert not os.path.exists(path)


def test_local_cluster_falls_back_to_tcp_without_its_unix_socket():
    with LocalCluster(cpus=1) as local:
        ((_, port),) = local.addresses
        os.unlink(os.path.join(local._dir, "node-0.sock"))
        with JobCluster(jobs.square, nodes=local) as cluster:
            assert cluster.submit(7)() == 49
            assert _tcp_links_to(port) != []


def test_local_cluster_runs_dispynbs_node_not_a_nodeserver_in_the_notebook_directory(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notebook directory holding a ``nodeserver`` package of its own (a user's
    project may): ``python -m nodeserver`` imported it first, the current directory
    leading the node's sys.path, so the cluster ran the user's code and never
    started. dispynb's node runs, and the directory's package is never imported."""
    imported = tmp_path / "imported"
    impostor = tmp_path / "nodeserver"
    impostor.mkdir()
    (impostor / "__init__.py").write_text(f"open({str(imported)!r}, 'w').close()\n")
    (impostor / "__main__.py").write_text("raise SystemExit('not a node')\n")
    monkeypatch.chdir(tmp_path)
    with LocalCluster(cpus=1) as local, JobCluster(jobs.square, nodes=local) as cluster:
        assert cluster.submit(7)() == 49
    assert not imported.exists()


def test_jobs_on_a_killed_local_node_end_at_once_saying_it_exited(tmp_path):
    """The OOM killer's SIGKILL ends a LocalCluster's node server: its running job
    is lost, and a job submitted then ends at once (Abandoned), saying which node
    exited and how, with its other processes gone. Before, the client tried for
    RECONNECT_FOR (60) s to reconnect to the process that had gone, and the job
    waited for it, then said only that no node was available."""
    with (
        LocalCluster(cpus=1) as local,
        JobCluster(jobs.mark_and_sleep, nodes=local) as cluster,
    ):
        running = cluster.submit(str(tmp_path / "started"), 60)
        jobs.wait_for_path(tmp_path / "started")
        node = psutil.Process(local.pids[0])
        family = [node, *node.children(recursive=True)]
        node.kill()
        assert running.finish.wait(WAIT), running.status
        assert running.status == DispyJob.Abandoned
        later = cluster.submit(None, 0)
        assert later.finish.wait(WAIT), "it waited for the node to come back"
        assert later.status == DispyJob.Abandoned
        expected = (
            f"local node local-0 (127.0.0.1:{local.addresses[0][1]}) has exited "
            "(killed by SIGKILL)"
        )
        assert expected in (later.exception or ""), later.exception
        assert "start a new LocalCluster" in (later.exception or "")
        _, alive = psutil.wait_procs(family, timeout=WAIT)
        assert not alive, alive


def test_a_users_msgpack_beside_the_script_leaves_the_local_nodes_working(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``msgpack.py`` (or ``cloudpickle.py``...) of the user's in the directory
    the program runs in: the local nodes, which kept that directory on their path
    (as ``python -m`` does), imported it for the package and exited at their start
    with "AttributeError: module 'msgpack' has no attribute 'Packer'". Then they
    imported those before the directory went back on their path, but not what
    they import later: a ``multiprocessing.py`` there, for the computations' names
    (dispy's). None of the directory's files is imported by a node now."""
    imported = tmp_path / "imported"
    for name in ("msgpack", "cloudpickle", "psutil", "cryptography", "multiprocessing"):
        (tmp_path / f"{name}.py").write_text(
            f"open({str(imported)!r}, 'a').write('{name} ')\n"
            f"raise SystemExit('user {name}.py')\n"
        )
    monkeypatch.chdir(tmp_path)
    with (
        LocalCluster(cpus=1) as local,
        JobCluster(jobs.square, nodes=local) as cluster,
    ):
        job = cluster.submit(7)
        assert job() == 49, job.exception
    assert not imported.exists(), imported.read_text()


def test_a_users_msgpack_beside_the_script_is_named_with_the_fix(tmp_path) -> None:
    """The program itself imports the user's ``msgpack.py`` (its directory leads
    sys.path): it failed at its first message with an AttributeError naming
    neither the file nor the fix."""
    (tmp_path / "msgpack.py").write_text("VERSION = 'mine'\n")
    script = tmp_path / "squares.py"
    script.write_text(
        "from dispynb import JobCluster, LocalCluster\n"
        "with LocalCluster(cpus=1) as local, JobCluster(abs, nodes=local) as c:\n"
        "    print(c.submit(-1)())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(dispynb.local.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"dispynb.errors.ShadowedPackageError: {tmp_path}/msgpack.py was imported "
        "as msgpack, a package dispynb needs, because its directory comes first on "
        "sys.path: rename that file, or move it out of that directory"
    ), done.stderr
