"""``dispynb-scheduler``'s command line: dispyscheduler's options work or are
refused with one line; an unsafe users file is refused."""

from __future__ import annotations

import argparse
import math
import os
import secrets
import signal
import socket
from pathlib import Path

import pytest

from dispynb import lockeddirs
from dispynb.errors import ConfigurationError
from schedserver.cli import build_parser, config_from_args, parse_args
from schedserver.parser import REFUSED
from tests.sharedsched.harness import SchedulerProcess, add_user, scheduler_cli


@pytest.mark.parametrize("option", sorted(REFUSED))
@pytest.mark.usefixtures("users")
def test_dispyscheduler_options_without_meaning_are_refused_in_one_line(
    option: str, tmp_path: Path
) -> None:
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "--users", str(tmp_path / "users"), f"--{option}"
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--{option} is not supported" in lines[0]


def test_dispyscheduler_options_that_apply_are_taken(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "-n", "10.0.0.1", "-n", "10.0.0.2:9000", "--users", "u", "--cpus", "3",
            "--pulse_interval", "2", "--zombie_interval", "5", "--msg_timeout", "20",
            "--max_cpus", "4", "--max_queued", "100", "-i", "127.0.0.1", "-p", "0",
            "--daemon", "--clean", "--fair_cluster_scheduler",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.nodes == [("10.0.0.1", 9711), ("10.0.0.2", 9000)]
    assert config.cpus == 3 and config.pulse_interval == 2.0
    assert config.zombie_interval == 300.0
    assert (config.connect_timeout, config.handshake_timeout) == (20.0, 10.0)
    assert (config.max_cpus, config.max_queued) == (4, 100)


def test_dispyschedulers_default_zero_intervals_are_taken(tmp_path: Path) -> None:
    """``--pulse_interval 0`` and ``--ping_interval 0`` are dispyscheduler's
    defaults (its config files write them, and were taken): on the command line
    they were refused ("must be within 0.1-1000 s")."""
    config = config_from_args(
        parse_args(["--users", "u", "--pulse_interval", "0", "--ping_interval", "0"])
    )
    assert (config.pulse_interval, config.ping_interval) == (1.0, None)


def test_dispyschedulers_zombie_interval_zero_is_never(tmp_path: Path) -> None:
    """dispyscheduler takes ``--zombie_interval 0`` as "never presume a silent
    client a zombie" (as dispynb-node does); it was refused ("must be more than 0
    minutes"), from the command line and from config files alike."""
    config = config_from_args(parse_args(["--users", "u", "--zombie_interval", "0"]))
    assert config.zombie_interval == math.inf
    with pytest.raises(ConfigurationError, match="or 0: never"):
        config_from_args(parse_args(["--users", "u", "--zombie_interval", "-1"]))


def test_dispyschedulers_older_poll_interval_is_taken(tmp_path: Path) -> None:
    """dispyscheduler 3.15 to 4.2 polled nodes for job results
    (``--poll_interval``); the scheduler here keeps a connection to each node, so
    there is nothing to poll: it is accepted and unused, as JobCluster's (before:
    "unrecognized arguments: --poll_interval")."""
    args = build_parser().parse_args(
        ["-n", "10.0.0.1", "--users", "u", "--poll_interval", "10"]
    )
    assert config_from_args(args).nodes == [("10.0.0.1", 9711)]


def test_missing_users_file_is_refused(tmp_path: Path) -> None:
    done = scheduler_cli("-n", "127.0.0.1")
    assert done.returncode == 2 and "--users" in done.stderr


def test_node_selection_options_of_dispyscheduler(tmp_path: Path) -> None:
    """Patterns (and no -n at all: dispyscheduler's '*') are discovered, named nodes
    are connected to; the older option names and the TLS options are taken."""
    from tests.transport.certs import make_cert

    cert, key = make_cert(tmp_path, "sched")
    config = config_from_args(build_parser().parse_args(["--users", "u"]))
    assert (config.nodes, config.discover) == ([], ["*"])
    args = build_parser().parse_args(
        [
            "--nodes", "10.0.0.*", "-n", "h1", "--node", "h2:5", "--node_port", "9000",
            "--ip_addr", "10.0.0.9", "--scheduler_port", "0", "--ping_interval", "5",
            "--ipv4_udp_multicast", "--users", "u",
            "--node_certfile", cert, "--node_keyfile", key,
            "--cluster_certfile", cert, "--cluster_keyfile", key,
            "--httpd", "--httpd_port", "0",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.nodes == [("h1", 9000), ("h2", 5)]
    assert config.discover == ["10.0.0.*"] and config.multicast
    assert config.hosts == ["10.0.0.9"] and config.port == 0
    assert config.ping_interval == 5.0
    assert config.node_ssl is not None and config.client_ssl is not None
    assert config.httpd and config.httpd_port == 0


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--ping_interval", "0.5"], "--ping_interval"),
        (["--node_keyfile", "k.pem"], "--node_certfile"),
        (["--cluster_keyfile", "k.pem"], "--cluster_certfile"),
        (["--cluster_certfile", "missing.pem"], "missing.pem"),
        (["--node_cafile", "missing.pem"], "missing.pem"),
        (["-n", "[::1"], "-n '[::1'"),
    ],
)
@pytest.mark.usefixtures("users")
def test_bad_node_options_are_refused_in_one_line(
    argv: list[str], says: str, tmp_path: Path
) -> None:
    # -n named: were a refusal missed, nothing would broadcast from this machine
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "-p", "0", "--users", str(tmp_path / "users"), *argv,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines


def test_a_node_secret_beginning_with_a_dash_is_refused_saying_how_to_give_it(
    tmp_path: Path,
) -> None:
    """``--node_secret -Zx``: argparse takes ``-Zx`` for an option; the scheduler
    said only "expected one argument". The way it names is taken (``--save_config``:
    the options given are read, the secret is left out of what it writes)."""
    users = str(tmp_path / "users")
    for option in ("--node_secret", "--node-secret"):
        done = scheduler_cli("-n", "127.0.0.1:1", "--users", users, option, "-Zx")
        assert done.returncode == 2
        assert done.stderr.endswith(
            "dispynb-scheduler: error: argument --node_secret/--node-secret: "
            "expected one argument (a value beginning with '-' goes after '=': "
            "--node_secret=VALUE)\n"
        ), done.stderr
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "--users", users, "--node_secret=-Zx", "--save_config"
    )
    assert done.returncode == 0, done.stderr
    assert "not --node_secret" in done.stderr and "-Zx" not in done.stdout
    config = tmp_path / "dispyscheduler.conf"
    config.write_text("[DEFAULT]\nnode_secret = -Zx\n")  # as dispyscheduler saves it
    assert parse_args(["--config", str(config), "--users", users]).node_secret == "-Zx"


@pytest.mark.usefixtures("users")
def test_users_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """The line names the file as the users file, and its mode: the file is
    often called ``users``, and 'users is readable' read as a sentence about
    users."""
    (tmp_path / "users").chmod(0o644)
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "-p", "0", "--users", str(tmp_path / "users")
    )
    assert done.returncode == 2 and "chmod 600" in done.stderr
    assert (
        f"dispynb-scheduler: users file {tmp_path / 'users'} is readable or writable "
        "by others (mode 0644)" in done.stderr
    ), done.stderr


def test_zombie_interval_is_in_minutes_with_fractions_and_must_be_positive(
    tmp_path: Path,
) -> None:
    args = build_parser().parse_args(
        ["-n", "127.0.0.1", "--users", "u", "--zombie_interval", "0.05"]
    )
    assert config_from_args(args).zombie_interval == pytest.approx(3.0)
    done = scheduler_cli("-n", "127.0.0.1:1", "--users", "u", "--zombie_interval", "-1")
    assert done.returncode == 2
    assert "--zombie_interval must be more than 0 minutes" in done.stderr


@pytest.mark.usefixtures("users")
def test_msg_timeout_scales_the_handshakes_of_nodes_and_clients(tmp_path: Path) -> None:
    """``--msg_timeout 2`` (dispy's MsgTimeout, 10 s by default): a "node" that
    accepts connections and says nothing is given up on after 1 s (half of it, as
    the handshake of 5 s is of 10), said once at warning level; a client that says
    nothing is cut off after 1 s too. Before, the option set a variable nothing in
    the scheduler read: 5 s each, and an unreachable node was logged only with -d."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the TCP handshakes; no one answers
        spec = f"127.0.0.1:{silent.getsockname()[1]}"
        sched = SchedulerProcess(
            tmp_path, [], "node-secret", args=("-n", spec, "--msg_timeout", "2")
        ).start()
        try:
            sched.wait_for_log(f"node {spec}: ")
            with socket.create_connection(("127.0.0.1", sched.port)):
                sched.wait_for_log("handshake timed out after 1 s")
        finally:
            sched.stop()
    log = sched.log_text()
    assert "did not complete the dispynb handshake in 1.0 s" in log, log
    assert log.count(f"node {spec}: ") == 1, log  # once: retries only with -d


@pytest.mark.parametrize("value", ["0", "-1", "5000"])
@pytest.mark.usefixtures("users")
def test_msg_timeout_out_of_range_is_refused_in_one_line(
    value: str, tmp_path: Path
) -> None:
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "-p", "0", "--users", str(tmp_path / "users"),
        "--msg_timeout", value,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == ["dispynb-scheduler: --msg_timeout must be within 0.1-3600 s"]


@pytest.mark.parametrize(
    ("option", "what"),
    [
        ("-p", ""),
        ("--register_port", "node registrations: "),
        ("--httpd_port", "web monitor: "),
    ],
)
@pytest.mark.usefixtures("users")
def test_a_port_in_use_names_the_option_to_change_and_exits_1(
    tmp_path: Path, option: str, what: str
) -> None:
    """Each port of the scheduler on a port another program holds: one line
    naming the address and the option to change (not the Python API's
    ``port=0``, nor '[Errno 98]'), exit status 1 as the node's (a port still held
    may pass: its service restarts it). The clients' port said 'choose another
    port', naming no option; registrations and the monitor exited 2, the
    registrations' line in asyncio's words."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"-p": "0", "--register_port": "0", "--httpd_port": "0"}
        ports[option] = port
        done = scheduler_cli(
            "-n", "127.0.0.1:1", "--users", str(tmp_path / "users"),
            "--node_secret", secrets.token_hex(32), "--httpd",
            *[word for pair in ports.items() for word in pair],
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "already in use" in x]
    fix = "-p/--port" if option == "-p" else option
    assert line.startswith(
        f"dispynb-scheduler: cannot start: {what}127.0.0.1:{port} is already in use "
        "(by a node or scheduler already running, or another program): stop it, or "
        f"give another {fix}"
    ), line


@pytest.mark.usefixtures("users")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_users_file_of_another_user_is_refused(tmp_path: Path) -> None:
    """Its owner could add users to it (mode 600 keeps out the others only)."""
    os.chown(tmp_path / "users", 65534, -1)
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "-p", "0", "--users", str(tmp_path / "users")
    )
    assert done.returncode == 2 and "belongs to" in done.stderr


def test_users_file_is_read_through_the_descriptor_it_was_checked_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked by path, then read by path: a file swapped in between (of another
    user's, or open to all) was read, with the users its writer put there."""
    import schedserver.users as users_module

    path = tmp_path / "users"
    path.write_text("alice aaaa\n")
    path.chmod(0o600)
    planted = tmp_path / "planted"
    planted.write_text("alice aaaa\nmallory mmmm\n")
    planted.chmod(0o666)
    checked = users_module.foreign_owner

    def swap_after_the_check(info: os.stat_result) -> str | None:
        os.replace(planted, path)  # between the check and the read
        return checked(info)

    monkeypatch.setattr(users_module, "foreign_owner", swap_after_the_check)
    assert users_module.UsersFile(path).load() == {"alice": b"aaaa"}


@pytest.mark.usefixtures("users")
def test_users_file_given_as_a_symlink_is_refused(tmp_path: Path) -> None:
    """A link can be turned to another file between checks and reads."""
    os.symlink(tmp_path / "users", tmp_path / "link")
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "-p", "0", "--users", str(tmp_path / "link")
    )
    assert done.returncode == 2 and "symbolic link" in done.stderr


def test_a_hangup_stops_the_scheduler_cleanly(tmp_path: Path) -> None:
    """SIGHUP (the terminal or ssh session it ran in closed) stops the scheduler as
    SIGTERM does, saying so, not at once without a word."""
    add_user(tmp_path, "alice")
    scheduler = SchedulerProcess(tmp_path, [], "node-secret").start()
    scheduler.stop(signal.SIGHUP)
    assert scheduler.proc is not None and scheduler.proc.returncode == 0
    assert "stopping (SIGHUP)" in scheduler.log_text()


def test_an_unknown_log_level_is_refused_in_one_line(tmp_path: Path) -> None:
    """As the node's: the levels are named, no traceback."""
    done = scheduler_cli("--users", str(tmp_path / "users"), "--loglevel", "verbose")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "'verbose'" in done.stderr and "warning" in done.stderr, done.stderr
    assert "--loglevel" in scheduler_cli("--help").stdout


def test_every_option_with_a_default_says_it_in_its_help() -> None:
    """``dispynb-scheduler --help`` is what an operator reads: an option that has
    a default says it (--pulse_interval, --keep_results, --jobs_per_cpu did not)."""
    silent = [
        action.option_strings[0]
        for action in build_parser()._actions
        if action.default not in (None, False, "", [], argparse.SUPPRESS)
        and "default" not in (action.help or "")
    ]
    assert not silent, silent


def test_user_list_of_a_missing_users_file_says_so(tmp_path: Path) -> None:
    """A mistyped --users path lists nobody silently no more; the user command's
    help says what each action does."""
    missing = tmp_path / "userz"
    done = scheduler_cli("user", "list", "--users", str(missing))
    assert done.returncode == 2 and f"no users file {missing}" in done.stderr
    assert not done.stdout
    add_user(tmp_path, "alice")
    listed = scheduler_cli("user", "list", "--users", str(tmp_path / "users"))
    assert listed.returncode == 0 and listed.stdout.split() == ["alice"]
    assert "issue a credential" in scheduler_cli("user", "--help").stdout


def test_user_add_makes_only_the_users_files_own_directory(tmp_path: Path) -> None:
    """``user add --users /missing/dir/users`` made the whole path (as root, even
    at /): an operator's typo is refused, saying so, and nothing is made or
    issued; the file's own directory (``/etc/dispynb`` of the README's
    ``/etc/dispynb/users``) is made, private. A credential's missing directory is
    refused before the user is added (its credential was lost, the name taken)."""
    typo = tmp_path / "missing" / "dir" / "users"
    done = scheduler_cli("user", "add", "alice", "--users", str(typo), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"no directory {typo.parent.parent} for the users file {typo}" in (
        done.stderr
    )
    assert not (tmp_path / "missing").exists()
    assert not list(tmp_path.glob("*.credential"))
    users = tmp_path / "etc" / "users"
    lost = tmp_path / "nowhere" / "alice.credential"
    done = scheduler_cli("user", "add", "alice", "--users", str(users), "-o", str(lost))
    assert done.returncode == 2 and "for the credential file" in done.stderr
    assert not users.exists()
    done = scheduler_cli("user", "add", "alice", "--users", str(users), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (users.parent.stat().st_mode & 0o777) == 0o700
    listed = scheduler_cli("user", "list", "--users", str(users))
    assert listed.stdout.split() == ["alice"]


def test_version_is_printed_as_the_nodes_is(tmp_path: Path) -> None:
    """``dispynb-scheduler --version`` was an unrecognized argument (exit 2), while
    ``dispynb-node --version`` answered."""
    from dispynb._version import __version__

    done = scheduler_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dispynb-scheduler {__version__}"
    assert "--version" in scheduler_cli("--help").stdout


#: Modules of the running scheduler that an administrator's command has no use for.
_SERVER_MODULES = ("asyncio", "schedserver.server", "ssl", "tornado", "cloudpickle")


def test_user_commands_import_nothing_of_the_server(tmp_path: Path) -> None:
    """``user add`` imported the whole server stack (asyncio, TLS, the web monitor,
    the scheduler): a second or more on a busy login node for writing one line,
    and it failed wherever one of them would not load. ``--version`` too."""
    import subprocess
    import sys

    from tests.sharedsched.harness import env_for

    users = str(tmp_path / "users")
    program = (
        "import sys; from schedserver.cli import main; code = main(sys.argv[1:]); "
        f"print(*sorted(m for m in {_SERVER_MODULES!r} if m in sys.modules)); "
        "sys.exit(code)"
    )
    for argv in (
        ["user", "add", "alice", "--users", users, "-o", str(tmp_path / "a.cred")],
        ["user", "list", "--users", users],
        ["user", "revoke", "alice", "--users", users],
    ):
        done = subprocess.run(
            [sys.executable, "-c", program, *argv],
            env=env_for(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "", (argv, done.stdout)


def test_a_stop_signal_while_starting_ends_the_scheduler_cleanly(
    tmp_path: Path,
) -> None:
    """A SIGTERM before the scheduler's event loop ran (here it waits for its
    --config, given as a pipe) killed it by the signal's default action."""
    import subprocess
    import sys

    from tests.jobs import wait_until
    from tests.sharedsched.harness import env_for

    fifo = tmp_path / "config.ini"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "schedserver", "--config", str(fifo)],
        env=env_for(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = -1
    try:

        def reading() -> bool:  # the scheduler opened the pipe: it parses options
            nonlocal writer
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return False
            return True

        wait_until(reading, timeout=30)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if writer >= 0:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err.strip() == "dispynb-scheduler: stopped by SIGTERM while starting"


def test_scheduler_stop_signal_whose_stop_python_dropped_still_stops_it(
    tmp_path: Path,
) -> None:
    """A SIGTERM handled inside a ``__del__`` (or a weakref or at-fork callback)
    while the scheduler started: Python printed "Exception ignored" and dropped the
    `StopSignal` its handler raised, and the scheduler went on to serve. Here the
    ``__del__`` runs while it imports its modules, every time."""
    import subprocess
    import sys

    from tests.sharedsched.harness import env_for

    add_user(tmp_path, "alice")
    users = tmp_path / "users"
    program = (
        "import os, signal, sys\n"
        "class Stop:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "class Finder:\n"
        "    stop = Stop()\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name == 'schedserver.cli':\n"
        "            del cls.stop\n"
        "        return None\n"
        "sys.meta_path.insert(0, Finder)\n"
        "import schedserver.__main__ as m\n"
        "sys.exit(m.main())"
    )
    options = ["-i", "127.0.0.1", "--port", "0", "--users", str(users)]
    proc = subprocess.Popen(
        [sys.executable, "-c", program, *options],
        env=env_for(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert err.strip() == "dispynb-scheduler: stopped by SIGTERM while starting"


def test_scheduler_group_sigterm_as_its_event_loop_starts_stops_it(
    tmp_path: Path,
) -> None:
    """A SIGTERM to the scheduler's process group (systemd stopping the unit's
    cgroup, a batch system its job) between start-up's last checkpoint and the
    event loop's handlers, handled where Python drops the `StopSignal` (here a
    ``__del__``): the scheduler served on, deaf to it, until SIGKILL."""
    import sys

    from tests.daemonhooks import run_in_own_group, stopped_as_loop_starts
    from tests.sharedsched.harness import env_for

    add_user(tmp_path, "alice")
    options = ["-i", "127.0.0.1", "--port", "0", "--users", str(tmp_path / "users")]
    program = stopped_as_loop_starts("schedserver")
    done = run_in_own_group(
        [sys.executable, "-c", program, *options], env_for(), 30, cwd=tmp_path
    )
    err = done.stderr
    assert done.returncode == 0, err
    assert "stopping (SIGTERM)" in err
    assert "stopped (SIGTERM)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("program", "modules"),
    [("nodeserver", "nodeserver.cli"), ("schedserver", "schedserver.cli")],
)
def test_version_loads_no_option_parser(program: str, modules: str) -> None:
    """``dispynb-node --version`` and ``dispynb-scheduler --version`` imported the
    option parsers and what they need (some 0.2 s, a second on a loaded machine)
    to print one line."""
    import subprocess
    import sys

    from dispynb._version import __version__
    from tests.sharedsched.harness import env_for

    code = (  # at exit: argparse's --version exits from the parser
        f"import atexit, sys, {program}.__main__ as m\n"
        f"atexit.register(lambda: print({modules!r} in sys.modules))\n"
        "sys.exit(m.main())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "--version"],
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    name = "dispynb-node" if program == "nodeserver" else "dispynb-scheduler"
    assert done.stdout.splitlines() == [f"{name} {__version__}", "False"]


def test_a_scheduler_says_where_it_serves_and_stopped_so_last(tmp_path: Path) -> None:
    """Its log ended with "stopping (SIGTERM)": whether it then stopped, or was
    killed or hung while stopping, the log did not say."""
    add_user(tmp_path, "alice")
    # Nodes register with it, and one named (not up: not waited for).
    args = ("--register_port", "0", "-n", "127.0.0.1:1")
    sched = SchedulerProcess(tmp_path, [], "node-secret", args=args)
    try:
        sched.start()
    finally:
        sched.stop()
    assert sched.proc is not None and sched.proc.returncode == 0
    lines = sched.log_text().strip().splitlines()
    # "serving 127.0.0.1:1 on ...": read as a node listening on the scheduler's port.
    serving = (
        f"dispynb-scheduler serving the users in {tmp_path / 'users'} on "
        f"{sched.address}, with node 127.0.0.1:1, nodes registering on port "
    )
    assert any(serving in line for line in lines), lines
    assert lines[-1].endswith("schedserver INFO stopped (SIGTERM)"), lines


@pytest.mark.timeout(60)
def test_a_node_refusing_the_schedulers_secret_is_logged_with_the_schedulers_fix(
    tmp_path: Path,
) -> None:
    """The scheduler's log named the node twice and gave a Python client's fix
    ("node H:P: H:P: ...; give this client the secret ... (secret=, ...)"), which
    its operator cannot give: now the scheduler's own options."""
    from tests.nodeproc import running_node

    with running_node(tmp_path / "node", secret="the-nodes-secret-5e1a9c") as node:
        sched = SchedulerProcess(
            tmp_path, [], "another-secret-7b3d20f4", args=("-n", node.spec)
        )
        add_user(tmp_path, "alice")
        sched.start()
        try:
            sched.wait_for_log("trying again")
        finally:
            sched.stop()
    [line] = [x for x in sched.log_text().splitlines() if "trying again" in x]
    assert line.endswith(
        f" WARNING node {node.spec}: the client's proof is wrong: it uses another "
        "secret than this node; give the scheduler the nodes' secret "
        "(--node_secret_file or DISPYNB_SECRET) (trying again)"
    ), line


@pytest.mark.usefixtures("users")
def test_a_cluster_certfile_without_its_key_names_cluster_keyfile(
    tmp_path: Path,
) -> None:
    """``--cluster_certfile`` of a certificate alone: it said 'cannot load
    certificate ... / key None: [SSL] PEM lib (_ssl.c:3926)'."""
    from tests.transport.certs import make_cert

    certfile, _keyfile = make_cert(tmp_path)
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "-p", "0", "--users", str(tmp_path / "users"),
        "--cluster_certfile", certfile,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"dispynb-scheduler: certfile {certfile!r} holds no private key: give the "
        "file of its key with --cluster_keyfile"
    ]


def test_user_add_does_not_write_a_credential_over_a_file(tmp_path: Path) -> None:
    """``user add bob -o alice.credential`` (a typo) silently replaced alice's
    credential with bob's: she was locked out until her own was issued again.
    An existing file is refused now, before the user is added; ``--force``
    replaces one (an old credential of a user revoked before); the users file
    itself is never written over."""
    users = tmp_path / "users"
    done = scheduler_cli("user", "add", "alice", "--users", str(users), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    alices = tmp_path / "alice.credential"
    before = alices.read_text()
    typo = ["user", "add", "bob", "--users", str(users), "-o", str(alices)]
    done = scheduler_cli(*typo, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"{alices} exists: not writing the credential over it" in done.stderr
    assert "--force" in done.stderr
    assert alices.read_text() == before
    listed = scheduler_cli("user", "list", "--users", str(users))
    assert listed.stdout.split() == ["alice"]  # bob not added: the name is free
    over_users = ["user", "add", "bob", "--users", str(users), "-o", str(users)]
    done = scheduler_cli(*over_users, "--force", cwd=tmp_path)
    assert done.returncode == 2 and "is the users file" in done.stderr
    assert scheduler_cli("user", "list", "--users", str(users)).stdout.split() == [
        "alice"
    ]
    # Alice's credential issued again: the revoked one replaced, as asked.
    assert (
        scheduler_cli("user", "revoke", "alice", "--users", str(users)).returncode == 0
    )
    again = ["user", "add", "alice", "--users", str(users), "--force"]
    done = scheduler_cli(*again, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert alices.read_text() != before and (alices.stat().st_mode & 0o777) == 0o600


def test_clean_removes_killed_schedulers_spill_directories_not_a_running_ones(
    tmp_path: Path,
) -> None:
    """``dispynb-scheduler --clean`` removed every ``spill-*`` directory under its
    ``--dest_path_prefix``, that of another scheduler running there too (which
    then could not spill: its new spill files failed), and said nothing. Now it
    leaves a directory whose scheduler runs (holds its lock) and says how many it
    removed. The running scheduler is this process's lock, as a scheduler's
    `SpillStore.directory` takes it."""
    add_user(tmp_path, "alice")
    prefix = tmp_path / "prefix"
    (prefix / "spill-killed").mkdir(parents=True)
    (prefix / "spill-running").mkdir()
    held = lockeddirs.hold(str(prefix / "spill-running"))
    try:
        args = ("--clean", "--dest_path_prefix", str(prefix), "-n", "127.0.0.1:1")
        with SchedulerProcess(tmp_path, [], "node-secret", args=args) as scheduler:
            scheduler.wait_for_log("--clean: removed")
        assert sorted(p.name for p in prefix.iterdir()) == ["spill-running"]
        assert (
            f"--clean: removed 1 spill directory left by schedulers killed in {prefix}"
            in scheduler.log_text()
        )
    finally:
        os.close(held)
