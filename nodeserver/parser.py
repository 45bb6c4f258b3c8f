"""``dispynb-node``'s command line: its options, dispynode's spellings of them, and
``--config``/``--save_config`` (see `nodeserver.cliconfig` for dispynode's options
that are refused and for config files)."""

from __future__ import annotations

import argparse
import datetime
import sys

from dispynb._version import version_line
from dispynb.defaults import (
    DISCOVERY_PORT,
    IPV4_MULTICAST_GROUP,
    MAX_MESSAGE_SIZE,
    NODE_PORT,
    SCHEDULER_REGISTER_PORT,
)
from dispynb.errors import ConfigurationError
from dispynb.secret import note_secret
from dispynb.transport.addressing import format_address, parse_address
from nodeserver.cliconfig import (
    CommandParser,
    add_refused,
    config_argv,
    save_config_and_exit,
)
from nodeserver.config import (
    DEFAULT_FILE_CACHE_SIZE,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_TRANSFER_QUOTA,
)
from nodeserver.service import parse_time

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``'10M'`` -> 10485760; plain numbers are bytes."""
    value = text.strip().lower().removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad size {text!r}: use e.g. 512K, 10M, 2G"
        ) from None
    return int(number * _UNITS[unit])


def _time_of_day(text: str) -> datetime.time:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``dispynb-node`` (dispynode's spellings too)."""
    parser = CommandParser(
        prog="dispynb-node",
        description="Run jobs of authenticated dispynb clients on this machine. "
        "dispynode's options are accepted; those dispynb does not support stop with "
        "the reason.",
    )
    add = parser.add_argument
    add("--config", metavar="FILE", help="read options from an INI file ([DEFAULT])")
    add(
        "--save_config",
        "--save-config",
        dest="save_config",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the options given to FILE (mode 600; never a --secret), or to "
        "standard output without FILE, and exit",
    )
    add(
        "-c",
        "--cpus",
        type=int,
        default=0,
        help="CPUs to use; 0 (default) = all, negative = all but that many",
    )
    add(
        "-i",
        "--host",
        "--ip_addr",
        dest="hosts",
        action="append",
        default=None,
        metavar="HOST",
        help="address to listen on, repeatable (default: every IPv4 address if a "
        "secret or TLS is given, else 127.0.0.1); others than loopback need a "
        "secret or TLS",
    )
    add(
        "-p",
        "--port",
        "--node_port",
        dest="port",
        type=int,
        default=NODE_PORT,
        help=f"TCP port (default {NODE_PORT})",
    )
    add(
        "-n",
        "--name",
        default=None,
        help="node name shown to clients (default: host name)",
    )
    add(
        "-s",
        "--secret",
        default=None,
        help="shared secret (in the process list until the node masks it, as it "
        "starts: prefer DISPYNB_SECRET or --secret-file)",
    )
    add(
        "--secret-file",
        "--secret_file",
        dest="secret_file",
        default=None,
        metavar="FILE",
        help="file holding the shared secret (mode 600)",
    )
    add(
        "--secret-stdin",
        action="store_true",
        help="read the shared secret from the first line of standard input (how "
        "launchers such as dispynb.deploy.SSHNodes hand it over: never on a command "
        "line, never in a file)",
    )
    add(
        "--new-secret",
        metavar="FILE",
        default=None,
        help="write a new random secret (256 bits) to FILE, created with mode 600 "
        "(never overwritten), and use it; give clients the same file",
    )
    add(
        "--certfile",
        default=None,
        metavar="FILE",
        help="TLS certificate (PEM); enables TLS",
    )
    add(
        "--keyfile",
        default=None,
        metavar="FILE",
        help="TLS private key (PEM), if not in --certfile",
    )
    add(
        "--cafile",
        default=None,
        metavar="FILE",
        help="CA to verify client certificates (mutual TLS)",
    )
    add(
        "--dest-path",
        "--dest_path",
        "--dest_path_prefix",
        dest="dest_path",
        default=None,
        metavar="DIR",
        help="directory for computations' files (default: <tmp>/dispynb)",
    )
    add(
        "--clean",
        action="store_true",
        help="empty the destination directory at start, files computations kept "
        "included (refused while another node runs on it; a running "
        "dispynb-scheduler's directory in it is left); without it, a node "
        "removes at start only what killed nodes left of computations whose files "
        "were to go",
    )
    add(
        "--force_cleanup",
        "--force-cleanup",
        dest="force_cleanup",
        action="store_true",
        help="remove every computation's files when it ends, even if its client "
        "asked to keep them (cleanup=False)",
    )
    add(
        "--max-file-size",
        "--max_file_size",
        dest="max_file_size",
        type=parse_size,
        default=DEFAULT_MAX_FILE_SIZE,
        help="largest file a client may send, e.g. 100M; 0: no limit (default 512M)",
    )
    add(
        "--transfer-quota",
        "--transfer_quota",
        dest="transfer_quota",
        type=parse_size,
        default=DEFAULT_TRANSFER_QUOTA,
        help="bytes of files one computation (client connection) may have on the "
        "node at once (files of jobs that ended count no more); 0: no limit "
        "(default 4G)",
    )
    add(
        "--file-cache-size",
        "--file_cache_size",
        dest="file_cache_size",
        type=parse_size,
        default=DEFAULT_FILE_CACHE_SIZE,
        help="bytes of files no client uses any more kept so that they need not be "
        "sent again (those idle longest go first, also when the disk is full); "
        "0: none (default 1G)",
    )
    add(
        "--max-message-size",
        "--max_message_size",
        dest="max_message_size",
        type=parse_size,
        default=MAX_MESSAGE_SIZE,
        help="largest message accepted from a client (default 1G)",
    )
    add(
        "--kept-results-size",
        type=parse_size,
        default=1 << 30,
        help="disk space for results kept for clients that may have crashed "
        "(recover_file), under the destination directory; results over it are not "
        "kept (default 1G)",
    )
    add(
        "--port-file",
        default=None,
        metavar="FILE",
        help="write the bound port to this file when ready",
    )
    add(
        "--unix-socket",
        default=None,
        metavar="FILE",
        help="also accept clients on this Unix socket; its directory must be private "
        "(0700): LocalCluster uses it, as loopback TCP costs more per message",
    )
    add(
        "--orphan-timeout",
        type=float,
        default=300.0,
        help="seconds a silent client keeps its computations (default 300; 0: ever)",
    )
    add(
        "--zombie_interval",
        "--zombie-interval",
        dest="zombie_interval",
        type=float,
        default=None,
        metavar="MINUTES",
        help="dispynode's spelling of --orphan-timeout, in minutes",
    )
    add(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM (SIGINT, SIGHUP), seconds running jobs may finish before "
        "they are terminated (default 30; 0: at once); a second signal terminates "
        "them at once. Jobs that did not start go back to their clients",
    )
    add(
        "--discovery",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="answer clients' UDP discovery pings and announce this node (default: "
        "on, as dispynode, unless the node listens on loopback only with a secret "
        "or TLS; without either it answers pings sent to 127.0.0.1 by clients on "
        "this machine that have no secret)",
    )
    add(
        "--discovery-port",
        type=int,
        default=DISCOVERY_PORT,
        help=f"UDP port for discovery pings (default {DISCOVERY_PORT}; clients hear "
        "announcements on the next port)",
    )
    add(
        "--ping_interval",
        "--ping-interval",
        dest="ping_interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also announce the node every SECONDS (default 0: at start and stop); "
        "with --register, how often it registers again while its client is away "
        "(default 5)",
    )
    add(
        "--ext-host",
        "--ext_host",
        "--ext_ip_addr",
        dest="ext_host",
        action="append",
        default=None,
        help="address (or name) announced for clients to connect to instead of the "
        "one discovery datagrams come from: for nodes behind NAT or with several "
        "addresses (clients use it only if it fits one of their node specs "
        "narrower than '*')",
    )
    add(
        "--ipv4-multicast",
        "--ipv4_udp_multicast",
        dest="ipv4_multicast",
        action="store_true",
        help=f"also answer pings sent to multicast group {IPV4_MULTICAST_GROUP}",
    )
    add(
        "--serve",
        type=int,
        default=-1,
        metavar="N",
        help="exit after serving N client connections (default -1: no limit; 0: "
        "exit at once, e.g. after --clean)",
    )
    for when, what in (
        ("start", "start serving"),
        ("stop", "take no new clients"),
        ("end", "end every client's jobs"),
    ):
        add(
            f"--service_{when}",
            f"--service-{when}",
            dest=f"service_{when}",
            type=_time_of_day,
            default=None,
            metavar="HH:MM",
            help=f"each day at HH:MM, {what}",
        )
    add(
        "--client_shutdown",
        "--client-shutdown",
        dest="client_shutdown",
        action="store_true",
        help="let computations' cleanup call dispynode_shutdown() to stop this node",
    )
    add(
        "--msg_timeout",
        "--msg-timeout",
        dest="msg_timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds a connecting client gets to authenticate (default 5); "
        "with --check, seconds the check waits for the node's answer (default 10)",
    )
    add(
        "--daemon",
        action="store_true",
        help="read no commands from standard input (without it the node does "
        "quit, exit, stop, start, cpus N and status typed there, as dispynode)",
    )
    add(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this node exits (LocalCluster)",
    )
    add(
        "--parent-pipe",
        type=int,
        default=None,
        metavar="FD",
        help="stop as soon as this inherited pipe reaches end of file, i.e. when "
        "every process holding its other end has exited (LocalCluster: the nodes "
        "die with the notebook kernel although they are in their own session)",
    )
    add(
        "--remove-when-orphaned",
        action="store_true",
        help="when the node stops because the process that started it exited "
        "(--parent-pipe, --exit-with-parent), remove its --dest-path, --port-file "
        "and --unix-socket, then the directory holding them if nothing else is "
        "left in it (LocalCluster's private directory: a killed notebook kernel "
        "leaves no files behind)",
    )
    add(
        "--register",
        metavar="HOST:PORT",
        default=None,
        help="once listening, register with the client listening for registrations "
        "at HOST:PORT (a launcher's): prove the secret, after which the client "
        "connects; the node stops if it cannot register within 30 s. Once "
        "registered it registers again while no session from the client is up "
        "(a restarted client finds it again)",
    )
    add(
        "--scheduler_host",
        "--scheduler_node",
        default=None,
        metavar="HOST[:PORT]",
        help="dispynode's: announce this node to the dispynb-scheduler on HOST; "
        f"--register HOST:{SCHEDULER_REGISTER_PORT} (the scheduler listens there "
        "with --register_port) that waits for a scheduler not up yet instead of "
        "stopping after 30 s",
    )
    add(
        "--scheduler_port",
        type=int,
        default=None,
        metavar="PORT",
        help="dispynode's up to 4.10: the port of --scheduler_host (here the "
        "scheduler's --register_port)",
    )
    add(
        "--exit-without-client",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="exit (draining as on SIGTERM) once no client has been connected for "
        "SECONDS, counted from start (from registration with --register) or from "
        "the last client's disconnection; a connected idle client keeps the node, "
        "and with --register so does the client it registered with while it "
        "accepts the node's registration again (default 0: never). Launchers "
        "(SlurmNodes) use it so that nodes whose client died end",
    )
    add(
        "--check",
        nargs="?",
        const="",
        default=None,
        metavar="HOST[:PORT]",
        help="do not serve: ask the node running at HOST[:PORT] (default: this "
        "machine, on --port) how it is, as a monitoring check; it authenticates "
        "with the same secret options (TLS: --cafile verifies the node, "
        "--certfile/--keyfile are presented to it), prints one line and exits 0 "
        "(it answered), 2 (not reachable, refused, no answer) or 3 (the check "
        "cannot run: an address that is no HOST[:PORT], an unreadable secret). "
        "The node counts it as no client",
    )
    add("-d", "--debug", action="store_true", help="log level debug")
    add(
        "--loglevel",
        default="info",
        type=str.lower,  # WARNING as logging spells it, as the scheduler takes it
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    add_refused(parser)
    add("--version", action="version", version=version_line("dispynb-node"))
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` after the options of its ``--config`` file (``argv`` wins)."""
    parser = build_parser()
    given = sys.argv[1:] if argv is None else list(argv)
    first, _ = parser.parse_known_args(given)
    if first.config:
        try:
            from_file = config_argv(parser, first.config)
        except ValueError as exc:
            parser.exit(2, f"dispynb-node: {exc}\n")
        given = from_file + given
    args = parser.parse_args(given)
    if args.secret:  # the zygote, forked after this, overwrites its copies
        note_secret(args.secret)
    # A secret read from the config file (dispynode saves its --secret there) is
    # not in the process list: say where it is instead.
    args.secret_in_config = bool(
        first.config and args.secret and args.secret != first.secret
    )
    if args.scheduler_port is not None:
        if not args.scheduler_host:
            parser.error(
                "--scheduler_port needs --scheduler_host (or --scheduler_node): the "
                "scheduler to register with"
            )
        try:
            host, port = parse_address(args.scheduler_host, args.scheduler_port)
        except ConfigurationError as exc:
            parser.error(f"--scheduler_host: {exc}")
        if port != args.scheduler_port:
            parser.error(
                f"--scheduler_host {args.scheduler_host} and --scheduler_port "
                f"{args.scheduler_port} name two ports: give one"
            )
        args.scheduler_host = format_address(host, port)
    if args.scheduler_host:
        # Its messages name the spelling given (dispynode's older docs wrote
        # --scheduler_node).
        args.scheduler_option = next(
            (
                word.split("=")[0]
                for word in reversed(given)
                if word.split("=")[0] in ("--scheduler_host", "--scheduler_node")
            ),
            "--scheduler_host",
        )
        try:
            host, port = parse_address(args.scheduler_host, SCHEDULER_REGISTER_PORT)
        except ConfigurationError as exc:
            parser.error(f"--scheduler_host: {exc}")
        address = format_address(host, port)
        if args.register and args.register != address:
            parser.error(
                f"--scheduler_host {args.scheduler_host} and --register "
                f"{args.register} name two places to register: give one"
            )
        args.register = address
    if args.save_config and args.new_secret:
        parser.error(
            "--new-secret is not saved in a configuration: make the secret first "
            "(dispynb secret FILE) and save --secret-file FILE"
        )
    if args.save_config:
        save_config_and_exit(
            parser, args, "not the secret: use DISPYNB_SECRET or --secret-file"
        )
    return args
