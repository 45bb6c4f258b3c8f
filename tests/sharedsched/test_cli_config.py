"""``dispynb-scheduler --config FILE`` and ``--save_config FILE``, as dispyscheduler's.

A dispy user's scheduler may start from a file ``dispyscheduler.py --save_config``
wrote: every option under its destination's name, at dispy's defaults when not given
(``dispy_port = 9700``, ``pulse_interval = 0``, ``scheduler_alg = None``...). Such a
file starts a real scheduler on its nodes here; an option it sets that has no meaning
here is refused with the command line's one line. Before, ``--config`` itself was
refused ("no configuration file").
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.errors import ConfigurationError
from dispynb.job import JobStatus
from schedserver.cli import config_from_args, parse_args
from tests.sharedsched.harness import SchedulerProcess, scheduler_cli

pytestmark = pytest.mark.timeout(120)

WAIT = 20.0


def dispyscheduler_config(**given: str) -> str:
    """The file ``dispyscheduler.py --save_config`` writes: every key, at dispy's
    default unless ``given``."""
    keys = {
        "loglevel": "False",
        "nodes": "[]",
        "hosts": "[]",
        "ext_hosts": "[]",
        "dispy_port": "9700",
        "ipv4_udp_multicast": "False",
        "node_secret": "",
        "node_keyfile": "",
        "node_certfile": "",
        "cluster_secret": "",
        "cluster_certfile": "",
        "cluster_keyfile": "",
        "pulse_interval": "0",
        "ping_interval": "0",
        "zombie_interval": "60",
        "msg_timeout": "10",
        "dest_path_prefix": "None",
        "max_file_size": "0",
        "clean": "False",
        "http_server": "False",
        "scheduler_alg": "None",
        "cooperative": "False",
        "cleanup_nodes": "False",
        "daemon": "False",
    }
    keys.update(given)
    return "[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"


def square(x: int) -> int:
    return x * x


@pytest.mark.slow
def test_a_dispyscheduler_config_file_starts_the_scheduler_on_its_nodes(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    specs = nodes.node_specs()
    config = tmp_path / "dispyscheduler.conf"
    config.write_text(
        dispyscheduler_config(
            nodes=repr(specs), loglevel="True", daemon="True", zombie_interval="5"
        )
    )
    with SchedulerProcess(
        tmp_path, [], nodes.secret, ("--config", str(config))
    ) as scheduler:
        scheduler.wait_for_log("is up with", len(specs))
        with SharedJobCluster(
            square, scheduler_host=scheduler.address, secret_file=str(users["alice"])
        ) as cluster:
            jobs = [cluster.submit(n) for n in range(6)]
            assert cluster.wait(timeout=WAIT)
        assert [(job.status, job.result) for job in jobs] == [
            (JobStatus.Finished, n * n) for n in range(6)
        ]
        assert " DEBUG " in scheduler.log_text()  # loglevel = True: -d


def test_the_keys_at_dispys_defaults_are_options_not_given(tmp_path: Path) -> None:
    """``dispy_port = 9700`` is not ``-p 9700``, ``pulse_interval = 0`` and
    ``ping_interval = 0`` not out of range, ``max_file_size = 0`` not "no limit":
    each is dispy's default written for an option not given."""
    config = tmp_path / "dispyscheduler.conf"
    config.write_text(
        dispyscheduler_config(nodes="['10.0.0.1', '10.0.0.2:9000']", hosts="[]")
    )
    args = parse_args(["--config", str(config), "--users", "u"])
    ours = config_from_args(
        parse_args(["-n", "10.0.0.1", "-n", "10.0.0.2:9000", "--users", "u"])
    )
    theirs = config_from_args(args)
    assert theirs.nodes == [("10.0.0.1", 9711), ("10.0.0.2", 9000)]
    assert (theirs.port, theirs.pulse_interval, theirs.ping_interval) == (
        ours.port,
        ours.pulse_interval,
        ours.ping_interval,
    )
    assert theirs.max_file_size == ours.max_file_size


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "dispyscheduler.conf"
    config.write_text(dispyscheduler_config(nodes="['10.0.0.1']", pulse_interval="3"))
    args = parse_args(
        ["--config", str(config), "--users", "u", "--pulse_interval", "2"]
    )
    assert config_from_args(args).pulse_interval == 2.0


def test_dispyschedulers_fair_cluster_scheduler_is_accepted(tmp_path: Path) -> None:
    """``--fair_cluster_scheduler`` (saved as ``scheduler_alg = fair_cluster``) asks
    for what this scheduler always does: taken, from a file and from the command
    line (it was refused: 'not supported')."""
    config = tmp_path / "dispyscheduler.conf"
    config.write_text(
        dispyscheduler_config(nodes="['10.0.0.1']", scheduler_alg="fair_cluster")
    )
    from_file = config_from_args(parse_args(["--config", str(config), "--users", "u"]))
    given = config_from_args(
        parse_args(["-n", "10.0.0.1", "--users", "u", "--fair_cluster_scheduler"])
    )
    assert from_file.nodes == given.nodes == [("10.0.0.1", 9711)]


@pytest.mark.parametrize(
    ("key", "value", "option"),
    [
        ("cooperative", "True", "--cooperative"),
        ("scheduler_alg", "fcfs_cluster", "--early_cluster_scheduler"),
        ("cluster_secret", "shared", "--cluster_secret"),
        ("ext_hosts", "['203.0.113.5']", "--ext_host"),
    ],
)
@pytest.mark.usefixtures("users")
def test_options_without_meaning_in_a_config_file_are_refused_in_one_line(
    tmp_path: Path, key: str, value: str, option: str
) -> None:
    config = tmp_path / "dispyscheduler.conf"
    config.write_text(dispyscheduler_config(nodes="['127.0.0.1:1']", **{key: value}))
    done = scheduler_cli("--config", str(config), "--users", str(tmp_path / "users"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{option} is not supported" in lines[0], done.stderr


def test_a_config_file_with_an_unknown_key_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    config = tmp_path / "scheduler.conf"
    config.write_text("[DEFAULT]\nnodes = ['10.0.0.1']\npulse_intervall = 2\n")
    done = scheduler_cli("--config", str(config), "--users", "u")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"dispynb-scheduler: config file {str(config)!r}, line 3: unknown option "
        "'pulse_intervall'"
    )


def test_a_bad_value_in_a_config_file_is_named_with_the_file_in_one_line(
    tmp_path: Path,
) -> None:
    """``max_cpus = many``: argparse's usage and its words for a command line."""
    config = tmp_path / "scheduler.conf"
    config.write_text("[DEFAULT]\nnodes = ['10.0.0.1']\nmax_cpus = many\n")
    done = scheduler_cli("--config", str(config), "--users", "u")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"dispynb-scheduler: config file {str(config)!r}, line 3: argument "
        "--max_cpus/--max-cpus: invalid int value: 'many'"
    )


def test_save_config_writes_what_config_reads_without_the_secret(
    tmp_path: Path,
) -> None:
    saved = tmp_path / "scheduler.conf"
    given = [
        "-n", "10.0.0.1", "-n", "10.0.0.2:9000", "--users", str(tmp_path / "u"),
        "--max_cpus", "4",
        "--zombie_interval", "5", "-d", "--node_secret", "not-to-be-saved",
    ]  # fmt: skip
    done = scheduler_cli(*given, "--save_config", str(saved))
    assert done.returncode == 0, done.stderr
    assert "not --node_secret" in done.stdout
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert "not-to-be-saved" not in saved.read_text()
    expected = config_from_args(parse_args([*given[:-2]]))
    again = config_from_args(parse_args(["--config", str(saved)]))
    assert again == expected


def test_a_saved_loglevel_is_read_back_from_the_config(tmp_path: Path) -> None:
    """``--loglevel warning`` saved is ``--loglevel warning`` read: it was read as
    dispyscheduler's ``-d`` (``loglevel = True``/``False``) and ignored."""
    saved = tmp_path / "scheduler.conf"
    done = scheduler_cli(
        "--users", "u", "--loglevel", "warning", "--save_config", str(saved)
    )
    assert done.returncode == 0, done.stderr
    args = parse_args(["--config", str(saved)])
    assert (args.loglevel, args.debug) == ("warning", False)


def test_save_config_writes_paths_given_relative_as_absolute(tmp_path: Path) -> None:
    """``--users users`` saved from the admin's directory is that file when a
    service reads the configuration from / (it was looked for there)."""
    saved = tmp_path / "scheduler.conf"
    done = scheduler_cli("--users", "users", "--save_config", str(saved), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert parse_args(["--config", str(saved)]).users == str(tmp_path / "users")


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_a_config_file_holding_the_node_secret_is_private_or_refused(
    tmp_path: Path, mode: int
) -> None:
    """``node_secret =`` in a config file others can read (dispyscheduler writes it
    with the umask's mode) was taken without a word: whoever read it could run code
    on every node. Refused as a --node_secret_file of that mode is; a private file
    is taken."""
    config = tmp_path / "scheduler.conf"
    config.write_text(
        f"[DEFAULT]\nusers = {tmp_path / 'u'}\nnode_secret = s3cret-0123456789\n"
    )
    config.chmod(mode)
    args = parse_args(["--config", str(config)])
    if mode == 0o600:
        assert config_from_args(args).node_secret == b"s3cret-0123456789"
        return
    with pytest.raises(ConfigurationError, match="holds the secret") as info:
        config_from_args(args)
    assert f"chmod 600 {config}" in str(info.value)
    assert "s3cret" not in str(info.value)
