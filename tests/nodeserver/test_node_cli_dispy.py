"""dispynode's options on ``dispynb-node``'s real command line (issue 11 item 6).

Each option either works as in dispy (its effect is checked on a running node) or
stops the node with one line saying why and what to use instead. Nodes listen on
127.0.0.1 (`tests.nodeproc`); options that need other addresses or discovery are
tested across namespace hosts in ``tests/multihost/test_dropin.py``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import DispynbError, NodeNotServingError
from dispynb.wording import counted
from nodeserver.cliconfig import REFUSED
from tests.jobs import WAIT, computation_processes, wait_until
from tests.nodeproc import (
    NODE_WAIT,
    CliNode,
    node_command,
    node_env,
    start_node,
    write_secret_file,
)
from tests.sharedsched.harness import SchedulerProcess, add_user
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow


def run_node(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a node that must exit by itself (a timeout fails the test)."""
    return subprocess.run(
        node_command(*args),
        env=node_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=NODE_WAIT,
        cwd=cwd,
    )


def write_in_cwd(name: str) -> str:
    """A job: leave a file in its working directory; return that directory."""
    with open(name, "w") as handle:
        handle.write("left by the job")
    return os.getcwd()


@pytest.mark.parametrize("option", sorted(REFUSED))
def test_unsupported_dispynode_option_stops_with_one_line(option: str) -> None:
    nargs, why = REFUSED[option]
    done = run_node(option, *(["value"] if nargs else []))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines == [f"dispynb-node: {option} is not supported: {why}"]
    assert len(why) > 40  # a reason, and what to do instead


def test_dispynode_spellings_work(tmp_path: Path) -> None:
    """``-d``, ``--dest_path_prefix``, ``--daemon``, ``--max_file_size``,
    ``--zombie_interval`` as a dispynode start script writes them."""
    prefix = tmp_path / "prefix"
    node = start_node(
        tmp_path / "node",
        "-d",
        "--daemon",
        "--dest_path_prefix", str(prefix),
        "--max_file_size", "1k",
        "--zombie_interval", "0.5",
    )  # fmt: skip
    check_small_debug_node(tmp_path, node, prefix)


def log_on_node(marker: str) -> str:
    """A job: log ``marker`` with dispynode_logger at debug and info level."""
    dispynode_logger.debug("debug %s", marker)  # type: ignore[name-defined]  # noqa: F821
    dispynode_logger.info("info %s", marker)  # type: ignore[name-defined]  # noqa: F821
    return marker


@pytest.mark.parametrize("debug", [True, False], ids=["-d", "default"])
def test_dispynode_logger_logs_debug_lines_on_a_node_started_with_d(
    tmp_path: Path, debug: bool
) -> None:
    """dispynode's ``-d`` shows the debug lines jobs log with ``dispynode_logger``
    (dispy's is the node's own logger); without it, its info lines only (before:
    the debug lines never showed)."""
    node = start_node(tmp_path / "node", *(["-d"] if debug else []))
    try:
        cluster = JobCluster(log_on_node, nodes=[node.spec], secret=node.secret)
        try:
            assert cluster.submit("marker-7f3a")() == "marker-7f3a"
        finally:
            cluster.close()
    finally:
        assert node.stop() == 0
    text = node.log_text()
    assert "info marker-7f3a" in text
    assert ("debug marker-7f3a" in text) == debug, text


def test_msg_timeout_bounds_an_unauthenticated_connection(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", "--msg_timeout", "0.5")
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=WAIT) as sock:
            # Nothing sent: the node closes it after 0.5 s (its default is 5 s).
            sock.settimeout(4.0)
            assert sock.recv(1) == b""
        wait_until(lambda: "handshake timed out after 0.5 s" in node.log_text())
    finally:
        assert node.stop() == 0


def test_serve_n_exits_after_n_clients(tmp_path: Path) -> None:
    """Another client meanwhile is told why the node refuses it. Before: the node
    closed its port, and the client said "nothing listens on port N there ... is
    dispynb-node running there?" of a node that runs."""
    node = start_node(tmp_path / "node", "--serve", "1")
    cluster = JobCluster(write_in_cwd, nodes=[node.spec], secret=node.secret)
    try:
        job = cluster.submit("x")
        assert job.wait(timeout=WAIT) and job.status == DispyJob.Finished
        # The node serves no other client meanwhile, and says why.
        with pytest.raises(NodeNotServingError) as refused:
            JobCluster(write_in_cwd, nodes=[node.spec], secret=node.secret)
        assert str(refused.value) == (
            f"{node.spec}: node 'cli-node' serves no more clients: --serve 1 "
            "reached (it exits once its last client leaves)"
        )
    finally:
        cluster.close()
    assert node.proc.wait(NODE_WAIT) == 0  # it exited by itself
    log = node.log_text()
    assert "served 1 client (--serve)" in log
    # Its last line says why, without parentheses in parentheses.
    assert log.rstrip().endswith("stopped (--serve 1: it served its 1 client)"), log


def test_serve_n_over_tls_tells_another_client_why(tmp_path: Path) -> None:
    """With TLS too (``--certfile``, ``--keyfile``), a client after the last
    one --serve N takes is told why over TLS. Before: the node closed its port,
    and the client said "nothing listens on port N there ... is dispynb-node
    running there?" of a node that runs."""
    cert, key = make_cert(tmp_path)
    node = start_node(
        tmp_path / "node", "--serve", "1", "--certfile", cert, "--keyfile", key
    )
    cluster = JobCluster(
        write_in_cwd, nodes=[node.spec], secret=node.secret, cafile=cert
    )
    try:
        job = cluster.submit("x")
        assert job.wait(timeout=WAIT) and job.status == DispyJob.Finished
        with pytest.raises(NodeNotServingError) as refused:
            JobCluster(write_in_cwd, nodes=[node.spec], secret=node.secret, cafile=cert)
        assert str(refused.value) == (
            f"{node.spec}: node 'cli-node' serves no more clients: --serve 1 "
            "reached (it exits once its last client leaves)"
        )
    finally:
        cluster.close()
    assert node.proc.wait(NODE_WAIT) == 0  # it exited by itself


@pytest.mark.parametrize("extra", [8, -8], ids=["more", "all-but-more"])
def test_cpus_beyond_the_machine_are_named_in_the_log(extra: int) -> None:
    """dispynode refuses ``-c N`` over the machine's CPUs, and ``-c -N`` leaving
    none. dispynb-node takes them (more jobs than CPUs suit jobs that wait on
    I/O; all but N leaving none serves 1) and says so in its log (before:
    nothing)."""
    available = os.cpu_count() or 1
    cpus = available + extra if extra > 0 else -(available + 8)
    done = run_node("-c", str(cpus), "--serve", "0")
    assert done.returncode == 0, done.stderr
    serves = cpus if extra > 0 else 1
    machine = counted(available, "CPU")
    assert f"--cpus {cpus}: this machine has {machine}" in done.stderr, done.stderr
    assert f"up to {counted(serves, 'job')} at once" in done.stderr


def test_serve_0_with_clean_empties_the_prefix_and_exits(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    (prefix / "leftover").mkdir(parents=True)
    done = run_node("--serve", "0", "--clean", "--dest_path_prefix", str(prefix))
    assert done.returncode == 0, done.stderr
    assert not prefix.exists()


def test_clean_refuses_to_empty_the_directory_of_a_running_node(
    tmp_path: Path,
) -> None:
    """dispynode's ``--clean`` is for what a node that did not exit cleanly left
    (dispynode refused to start a second node on a prefix in use). A second
    ``dispynb-node --clean`` on the directory of a running node stops with a line
    saying so, and leaves that node's files alone (before: it emptied them, the
    running node's jobs losing their files); once that node stopped, --clean
    empties it."""
    node = start_node(tmp_path / "node")
    dest = tmp_path / "node" / "dest"
    try:
        cluster = JobCluster(write_in_cwd, nodes=[node.spec], secret=node.secret)
        try:
            job = cluster.submit("x")
            assert job.wait(timeout=WAIT) and job.status == DispyJob.Finished
            before = sorted(p.name for p in dest.iterdir())
            done = run_node("--serve", "0", "--clean", "--dest_path_prefix", str(dest))
            assert done.returncode == 2, done.stderr
            assert "another dispynb-node is using" in done.stderr, done.stderr
            assert str(dest) in done.stderr
            assert sorted(p.name for p in dest.iterdir()) == before
            assert cluster.submit("y")() == job.result  # its directory is still there
        finally:
            cluster.close()
    finally:
        assert node.stop() == 0
    done = run_node("--serve", "0", "--clean", "--dest_path_prefix", str(dest))
    assert done.returncode == 0, done.stderr
    assert not dest.exists()


def test_clean_leaves_a_running_schedulers_directory_and_says_what_it_removed(
    tmp_path: Path,
) -> None:
    """The scheduler's default directory, ``<tmp>/dispynb/scheduler``, is in the
    node's default, ``<tmp>/dispynb``: ``dispynb-node --clean`` there removed it
    under a running ``dispynb-scheduler`` (its results spill there), and said only
    "removed <tmp>/dispynb". Now it leaves that directory, removes the rest, and
    says how much it removed and what it left, and why."""
    dest = tmp_path / "dispynb"
    (dest / "left-by-a-killed-node").mkdir(parents=True)
    (dest / "left-by-a-killed-node" / "data").write_bytes(b"x" * 1000)
    add_user(tmp_path, "alice")
    prefix = ("--dest_path_prefix", str(dest / "scheduler"), "-n", "127.0.0.1:1")
    with SchedulerProcess(tmp_path, [], "node-secret", args=prefix):
        done = run_node("--serve", "0", "--clean", "--dest_path_prefix", str(dest))
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in dest.iterdir()) == ["scheduler"]
    assert (
        f"--clean: removed 1 file (1000 B) in {dest}; left {dest}/scheduler: "
        "a running process uses it (a dispynb-scheduler's --dest_path_prefix?)"
    ) in done.stderr, done.stderr
    # Once the scheduler stopped, --clean empties it all, as before.
    done = run_node("--serve", "0", "--clean", "--dest_path_prefix", str(dest))
    assert done.returncode == 0, done.stderr
    assert not dest.exists()


def kill_node_and_its_processes(node: CliNode) -> None:
    """SIGKILL the node and every process under it at once, as the out-of-memory
    killer or a batch system ending its cgroup would: nothing of it cleans up."""
    family = [psutil.Process(node.proc.pid)]
    family += family[0].children(recursive=True)
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(family, timeout=NODE_WAIT)
    node.proc.wait(NODE_WAIT)


def test_a_killed_nodes_directories_go_when_the_next_node_starts_there(
    tmp_path: Path,
) -> None:
    """A node killed with computations open left their directories, the jobs'
    files and all, until someone ran ``--clean`` (which dispy also needs): a node
    killed again and again filled its disk. The next node started on the directory
    removes those of computations with ``cleanup`` (the default), before it serves,
    and says so; one a client kept (``cleanup=False``) stays, as in dispy; and a
    node started there while another runs removes nothing of the other's."""
    node = start_node(tmp_path / "node")
    dest = tmp_path / "node" / "dest"
    removed = JobCluster(write_in_cwd, nodes=[node.spec], secret=node.secret)
    kept = JobCluster(
        write_in_cwd, nodes=[node.spec], secret=node.secret, cleanup=False
    )
    try:
        gone = Path(removed.submit("a.txt")())
        stays = Path(kept.submit("b.txt")())
        assert (gone / "a.txt").exists() and (stays / "b.txt").exists()
        beside = start_node(tmp_path / "beside", "--dest-path", str(dest))
        assert beside.stop() == 0
        assert (gone / "a.txt").exists()  # still in use: not removed
        assert "left by a node" not in beside.log_text()
        kill_node_and_its_processes(node)
    finally:
        removed.close()
        kept.close()
    assert (gone / "a.txt").exists()  # what the killed node left
    again = start_node(tmp_path / "again", "--dest-path", str(dest))
    try:
        assert not gone.exists()
        assert not gone.parent.exists()  # its client's session directory too
        assert (stays / "b.txt").read_text() == "left by the job"
        assert (
            f"removed 1 directory left by a node that did not exit cleanly in {dest}"
            in again.log_text()
        ), again.log_text()
    finally:
        assert again.stop() == 0


@pytest.mark.parametrize("force", [False, True], ids=["kept", "force_cleanup"])
def test_force_cleanup_removes_files_a_client_kept(tmp_path: Path, force: bool) -> None:
    args = ["--force_cleanup"] if force else []
    node = start_node(tmp_path / "node", *args)
    try:
        cluster = JobCluster(
            write_in_cwd, nodes=[node.spec], secret=node.secret, cleanup=False
        )
        try:
            job = cluster.submit("out.txt")
            assert job.wait(timeout=WAIT) and job.status == DispyJob.Finished
            left = Path(job.result) / "out.txt"
            assert left.exists()
        finally:
            cluster.close()
        if force:
            wait_until(lambda: not left.exists())
        else:
            assert left.exists()
    finally:
        assert node.stop() == 0


def test_dispynode_config_file_is_read_safely(tmp_path: Path) -> None:
    """A config file as ``dispynode.py --save_config`` (dispy 4.15) writes it: every
    option under its argparse destination (``loglevel``, ``hosts``, ``node_init``,
    ``safe_setup``...), lists as Python literals (read with ast.literal_eval, never
    eval), defaults ignored. The command line (here `start_node`'s own options) wins
    over the file."""
    config = tmp_path / "node.ini"
    config.write_text(
        "[DEFAULT]\n"
        "cpus = 0\n"
        "loglevel = True\n"
        "hosts = ['127.0.0.1']\n"
        "ext_hosts = []\n"
        "dispy_port = 9700\n"
        "ipv4_udp_multicast = False\n"
        "name = \n"
        "dest_path_prefix = \n"
        "node_init = \n"
        "scheduler_host = \n"
        "max_file_size = 1k\n"
        "zombie_interval = 60.0\n"
        "ping_interval = 0\n"
        "service_start = \n"
        "service_stop = \n"
        "service_end = \n"
        "serve = -1\n"
        "client_shutdown = False\n"
        "force_cleanup = False\n"
        "msg_timeout = 10\n"
        "secret = \n"
        "admin_secret = \n"
        "certfile = \n"
        "keyfile = \n"
        "clean = False\n"
        "safe_setup = True\n"
        "daemon = False\n"
    )
    check_config_node(tmp_path, config)


def check_config_node(tmp_path: Path, config: Path) -> None:
    """A node started with ``config`` (``-d``, ``max_file_size = 1k``): as
    `check_small_debug_node` says."""
    node = start_node(tmp_path / "node", "--config", str(config))
    check_small_debug_node(tmp_path, node)


def check_small_debug_node(
    tmp_path: Path, node: CliNode, prefix: Path | None = None
) -> None:
    """``node`` (started with ``-d`` and a --max_file_size of 1k) runs a job (in
    ``prefix``, if given), refuses a larger file, and logs at debug level; it is
    stopped."""
    try:
        cluster = JobCluster(write_in_cwd, nodes=[node.spec], secret=node.secret)
        try:
            job = cluster.submit("out.txt")
            assert job.wait(timeout=WAIT) and job.status == DispyJob.Finished
            if prefix is not None:
                assert Path(job.result).is_relative_to(prefix)
        finally:
            cluster.close()
        big = tmp_path / "big.bin"
        big.write_bytes(b"x" * 4096)
        with pytest.raises(DispynbError, match=r"big\.bin"):
            JobCluster(
                write_in_cwd, nodes=[node.spec], secret=node.secret, depends=[big]
            )
    finally:
        assert node.stop() == 0
    assert " DEBUG " in node.log_text()


def test_a_secret_from_a_dispynode_config_file_is_not_said_to_be_in_the_process_list(
    tmp_path: Path,
) -> None:
    """dispynode saves its ``--secret`` in the config file: a private one (mode 600)
    is as good as a secret file, with no warning about the process list."""
    config = tmp_path / "node.ini"
    config.write_text("[DEFAULT]\nhosts = ['127.0.0.1']\nsecret = abc\n")
    config.chmod(0o600)
    done = run_node("--config", str(config), "--serve", "0")
    assert done.returncode == 0, done.stderr
    assert "process list" not in done.stderr and "secret" not in done.stderr
    done = run_node("--config", str(config), "--secret", "def", "--serve", "0")
    assert done.returncode == 0, done.stderr
    assert "--secret was visible to other users in the process list" in done.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_a_config_file_holding_the_secret_that_others_can_read_is_refused(
    tmp_path: Path, mode: int
) -> None:
    """A dispynode config file with ``secret =`` readable by the group or everyone
    (dispynode writes it with the umask's mode) was only warned about, and the node
    served: whoever could read the file could run code on it. Refused now, as a
    --secret-file of that mode is, saying how to fix it."""
    config = tmp_path / "node.ini"
    config.write_text("[DEFAULT]\nhosts = ['127.0.0.1']\nsecret = abc\n")
    config.chmod(mode)
    done = run_node("--config", str(config), "--serve", "0")
    assert done.returncode != 0
    assert f"config file '{config}' holds the secret" in done.stderr, done.stderr
    assert f"chmod 600 {config}" in done.stderr
    assert "abc" not in done.stderr


def test_a_secret_beginning_with_a_dash_in_a_dispynode_config_file_is_read(
    tmp_path: Path,
) -> None:
    """``secret = -...`` in dispynode's config file: the file's options went to
    argparse as two words (``--secret -...``), refused as "expected one argument"."""
    config = tmp_path / "node.ini"
    config.write_text("[DEFAULT]\nsecret = -begins-with-a-dash-0123456789\n")
    config.chmod(0o600)
    node = start_node(tmp_path / "node", "--config", str(config))
    try:
        with JobCluster(
            write_in_cwd, nodes=[node.spec], secret="-begins-with-a-dash-0123456789"
        ) as cluster:
            job = cluster.submit("x")
            assert job.wait(timeout=WAIT) and job.status == DispyJob.Finished
    finally:
        assert node.stop() == 0


def test_config_file_naming_an_unsupported_option_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.ini"
    # dispynode saves --init as node_init, --unsafe_setup as safe_setup = False
    for line, option in [
        ("init = /etc/node_init.py", "--init"),
        ("node_init = /etc/node_init.py", "--init"),
        ("safe_setup = False", "--unsafe_setup"),
    ]:
        config.write_text(f"[DEFAULT]\n{line}\n")
        done = run_node("--config", str(config))
        assert done.returncode == 2
        assert done.stderr.startswith(f"dispynb-node: {option} is not supported")
    config.write_text("[DEFAULT]\nhosts = __import__('os').system('true')\n")
    done = run_node("--config", str(config))
    assert done.returncode == 2
    assert "hosts must be a list of strings" in done.stderr
    config.write_text("[DEFAULT]\n# tuned for the lab\nno_such_option = 1\n")
    done = run_node("--config", str(config))
    assert done.returncode == 2
    assert "line 3: unknown option 'no_such_option'" in done.stderr


def test_a_bad_value_in_a_config_file_is_named_with_the_file_in_one_line(
    tmp_path: Path,
) -> None:
    """``cpus = x`` in the file: it said 'argument -c/--cpus: invalid int value',
    after a usage, as if the admin had typed -c; then the file, not the line (an
    admin's file runs to dozens of lines: now it names the line)."""
    config = tmp_path / "node.ini"
    config.write_text("[DEFAULT]\nport = 9711\n\nCPUS = x\n")
    done = run_node("--config", str(config))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"dispynb-node: config file {str(config)!r}, line 4: argument -c/--cpus: "
        "invalid int value: 'x'"
    ]


def test_config_file_with_options_outside_default_is_refused(tmp_path: Path) -> None:
    """Options under a section of their own (``[node]``) were ignored without a word,
    the node starting with its defaults; a file without a section header said only
    configparser's words. Both now stop, saying where options go."""
    config = tmp_path / "node.ini"
    config.write_text("[DEFAULT]\nzombie_interval = 7\n[node]\ncpus = 1\n")
    done = run_node("--config", str(config))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"dispynb-node: config file {str(config)!r} has options under [node], which "
        "would be ignored: only [DEFAULT] is read (as in dispy's config files and "
        "those --save_config writes): move them under [DEFAULT]"
    )
    config.write_text("cpus = 1\n")
    done = run_node("--config", str(config))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"dispynb-node: config file {str(config)!r} has no section header: put a "
        "line [DEFAULT] before its options (as in dispy's config files and those "
        "--save_config writes)"
    )


def test_save_config_then_config_round_trip_without_the_secret(
    tmp_path: Path,
) -> None:
    saved = tmp_path / "saved.ini"
    done = run_node(
        "--save_config", str(saved),
        "--secret", "never-written-to-the-file-0123456789",
        "--zombie_interval", "2",
        "--max_file_size", "1k",
        "-d",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "not the secret" in done.stdout
    text = saved.read_text()
    assert "never-written" not in text
    assert oct(saved.stat().st_mode & 0o777) == oct(0o600)
    assert "zombie_interval = 2.0" in text
    check_config_node(tmp_path, saved)


def test_save_config_over_a_file_open_to_others_leaves_it_private(
    tmp_path: Path,
) -> None:
    """Saved over an existing file, the configuration kept that file's mode (here
    world-readable and writable: anyone could then change the node's options), and
    was written through a symlink put in its place."""
    saved, elsewhere = tmp_path / "saved.ini", tmp_path / "elsewhere"
    saved.write_text("[DEFAULT]\n")
    saved.chmod(0o666)
    done = run_node("--save_config", str(saved), "--zombie_interval", "2", "-d")
    assert done.returncode == 0, done.stderr
    assert oct(saved.stat().st_mode & 0o777) == oct(0o600)
    assert "zombie_interval = 2.0" in saved.read_text()
    elsewhere.write_text("theirs\n")
    saved.unlink()
    saved.symlink_to(elsewhere)
    done = run_node("--save_config", str(saved), "--zombie_interval", "2", "-d")
    assert done.returncode == 0, done.stderr
    assert elsewhere.read_text() == "theirs\n" and not saved.is_symlink()


def test_save_config_without_a_file_writes_the_configuration_to_stdout(
    tmp_path: Path,
) -> None:
    """dispynode's documentation: "If file is not given, the configuration is
    written to stdout" (``dispynode.py ... --save_config > node.cfg``)."""
    done = run_node(
        "-d",
        "--zombie_interval", "2",
        "--max_file_size", "1k",
        "--secret", "never-written-to-stdout-0123456789",
        "--save_config",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "never-written" not in done.stdout
    assert done.stdout.startswith("# dispynb-node options"), done.stdout
    assert "zombie_interval = 2.0" in done.stdout
    assert "not the secret" in done.stderr  # the note stays out of the configuration
    saved = tmp_path / "node.cfg"
    saved.write_text(done.stdout)
    check_config_node(tmp_path, saved)


@pytest.mark.parametrize("option", ["--scheduler_host", "--scheduler_node"])
def test_scheduler_host_without_a_secret_names_the_option_given(option: str) -> None:
    """dispynode's ``--scheduler_host`` (``--scheduler_node`` in its older
    documentation) on a node without a secret: the refusal names that option, not
    ``--register`` (which the user never typed), and says that on one machine the
    scheduler finds the node without it."""
    done = run_node(option, "127.0.0.1")
    assert done.returncode == 2, done.stderr
    assert f"{option} needs a secret" in done.stderr, done.stderr
    assert "--register" not in done.stderr
    assert "finds this node by discovery" in done.stderr


def _hhmm(delta_hours: int) -> str:
    moment = datetime.datetime.now() + datetime.timedelta(hours=delta_hours)
    return moment.strftime("%H:%M")


def test_service_window_open_now_serves(tmp_path: Path) -> None:
    node = start_node(
        tmp_path / "node",
        "--service_start", _hhmm(-2),
        "--service_stop", _hhmm(2),
        "--service_end", _hhmm(3),
    )  # fmt: skip
    try:
        cluster = JobCluster(write_in_cwd, nodes=[node.spec], secret=node.secret)
        try:
            job = cluster.submit("x")
            assert job.wait(timeout=WAIT) and job.status == DispyJob.Finished
        finally:
            cluster.close()
    finally:
        assert node.stop() == 0


def test_service_window_closed_now_does_not_listen(tmp_path: Path) -> None:
    secret_file = write_secret_file(tmp_path / "secret", "service-window-secret-0123")
    port_file = tmp_path / "port"
    log = tmp_path / "node.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            node_command(
                "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                "--secret-file", str(secret_file), "--dest-path", str(tmp_path / "d"),
                "--service_start", _hhmm(2), "--service_end", _hhmm(3),
            ),
            env=node_env(),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "outside its service window" in log.read_text())
        assert f"not serving until {_hhmm(2)}" in log.read_text() or (
            "not serving until" in log.read_text()  # the minute turned meanwhile
        )
        assert not port_file.exists()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(NODE_WAIT) == 0


def test_service_start_alone_is_refused_with_the_fix() -> None:
    done = run_node("--service_start", "08:00")
    assert done.returncode == 2
    assert "--service_start needs --service_stop or --service_end" in done.stderr
    done = run_node("--service_end", "25:99")
    assert done.returncode == 2
    assert "bad time of day '25:99': use HH:MM" in done.stderr


def test_two_ext_hosts_are_refused() -> None:
    done = run_node("--ext_host", "10.0.0.1", "--ext_host", "10.0.0.2")
    assert done.returncode == 2
    assert "give one --ext-host" in done.stderr


SILENT_CLIENT = """
import sys, time
import dispynb as dispy
def sleeper(_):
    import time
    time.sleep(120)
cluster = dispy.JobCluster(sleeper, nodes=[sys.argv[1]], secret=sys.argv[2])
cluster.submit(0)
print("submitted", flush=True)
time.sleep(120)
"""


def test_zombie_interval_frees_a_silent_clients_computation(tmp_path: Path) -> None:
    """``--zombie_interval`` is in minutes, as dispynode's: 0.02 min = 1.2 s."""
    script = tmp_path / "client.py"
    script.write_text(SILENT_CLIENT)
    node = start_node(tmp_path / "node", "--zombie_interval", "0.02")
    client = subprocess.Popen(
        [sys.executable, str(script), node.spec, node.secret],
        cwd=tmp_path,  # where the killed client leaves its recovery file
        stdout=subprocess.PIPE,
        text=True,
        env=node_env(),
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "submitted"
        server = psutil.Process(node.proc.pid)
        wait_until(lambda: len(computation_processes(server)) >= 2)
        os.kill(client.pid, signal.SIGSTOP)  # alive, connected, silent
        wait_until(lambda: not computation_processes(server), timeout=20)
        assert "silent" in node.log_text()
    finally:
        client.kill()
        client.wait()
        if client.stdout is not None:
            client.stdout.close()
        assert node.stop() == 0


@pytest.mark.parametrize("level", ["warning", "debug", "WARNING"])
def test_a_saved_loglevel_is_read_back_from_the_config(
    tmp_path: Path, level: str
) -> None:
    """``--save_config`` writes ``--loglevel warning`` as ``loglevel = warning``:
    ``--config`` gives it back. Before, it read the key as dispynode's ``-d``
    (``loglevel = True``/``False``), and a node meant to be quiet logged INFO.
    The level is taken in any case, as logging spells it (``WARNING``), as the
    scheduler takes it: it was refused."""
    from nodeserver.parser import parse_args

    saved = tmp_path / "saved.ini"
    done = run_node("--save_config", str(saved), "--loglevel", level)
    assert done.returncode == 0, done.stderr
    assert f"loglevel = {level.lower()}" in saved.read_text()
    args = parse_args(["--config", str(saved)])
    assert (args.loglevel, args.debug) == (level.lower(), False)
    saved.write_text("[DEFAULT]\nloglevel = True\n")  # as dispynode -d wrote it
    assert parse_args(["--config", str(saved)]).debug is True


def test_save_config_writes_paths_given_relative_as_absolute(tmp_path: Path) -> None:
    """A configuration saved in one directory and used by a service started in
    another (systemd's working directory is /): its files are where they were
    when it was saved. Before, ``secret_file = node.secret`` was looked for
    under /."""
    from nodeserver.parser import parse_args

    saved = tmp_path / "saved.ini"
    done = run_node(
        "--save_config", str(saved),
        "--secret-file", "node.secret",
        "--dest-path", "work",
        "--certfile", "tls/node.pem",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    args = parse_args(["--config", str(saved)])
    assert args.secret_file == str(tmp_path / "node.secret")
    assert args.dest_path == str(tmp_path / "work")
    assert args.certfile == str(tmp_path / "tls" / "node.pem")
