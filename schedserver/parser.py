"""``dispynb-scheduler``'s command line: its options, dispyscheduler's spellings of
them, those of dispyscheduler's that are refused and why, and ``--config``/
``--save_config`` (`schedserver.cliconfig` reads dispyscheduler's config files)."""

from __future__ import annotations

import argparse

from dispynb._version import version_line
from dispynb.defaults import NODE_PORT, SCHEDULER_PORT, SCHEDULER_REGISTER_PORT
from nodeserver.cliconfig import CommandParser, save_config_and_exit

#: dispyscheduler options dispynb-scheduler does not offer, and why (one line each).
REFUSED = {
    "early_cluster_scheduler": "scheduling is always fair share between users "
    "(--fair_cluster_scheduler), never the earliest cluster first",
    "cooperative": "clients cannot change nodes' CPUs; use --cpus or --max_cpus",
    "cleanup_nodes": "each computation's own cleanup applies on the nodes; to "
    "remove every computation's files whatever its cleanup=, start the nodes with "
    "--force_cleanup",
    "ext_host": "clients connect to the addresses given with -i, and the scheduler "
    "connects to its nodes: it has no address to advertise",
    "ext_ip_addr": "clients connect to the addresses given with -i, and the scheduler "
    "connects to its nodes: it has no address to advertise",
    "cluster_secret": "each user proves a credential of its own ('dispynb-scheduler "
    "user add NAME'): there is no secret shared by all clients",
}


def both_spellings(name: str) -> list[str]:
    """dispy's ``--under_score`` spelling and the ``--dash-ed`` one."""
    dashed = name.replace("_", "-")
    return [f"--{name}"] if dashed == name else [f"--{name}", f"--{dashed}"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``dispynb-scheduler``."""
    from nodeserver.parser import parse_size
    from schedserver.config import SchedulerConfig

    parser = CommandParser(
        prog="dispynb-scheduler",
        description="Share dispynb nodes between many clients (SharedJobCluster): "
        "fair share of CPUs between users, per-user credentials, jobs kept for "
        "clients that come back. 'dispynb-scheduler user add NAME' issues a "
        "credential.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="read options from an INI file ([DEFAULT]): one --save_config wrote, "
        "or dispyscheduler's (options on the command line win)",
    )
    parser.add_argument(
        *both_spellings("save_config"),
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the options given to FILE (mode 600; never --node_secret), or to "
        "standard output without FILE, and exit",
    )
    parser.add_argument(
        "-n",
        "--node",
        "--nodes",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="a node to use, or a pattern of nodes to discover by UDP broadcast "
        "('*', '10.0.0.*'); repeat it; default '*' (discover), none with "
        "--register_port (only the nodes that register)",
    )
    parser.add_argument(
        *both_spellings("register_port"),
        type=int,
        nargs="?",
        const=SCHEDULER_REGISTER_PORT,
        default=None,
        metavar="PORT",
        help="also take nodes that register themselves ('dispynb-node --register "
        f"THISHOST:{SCHEDULER_REGISTER_PORT}', or dispynode's --scheduler_host "
        "THISHOST): listen for their registrations on PORT (default "
        f"{SCHEDULER_REGISTER_PORT}; 0: a free one, logged) on the -i interfaces; "
        "a node proving the node secret is used like one named with -n; off unless "
        "given",
    )
    parser.add_argument(
        *both_spellings("node_port"),
        type=int,
        default=NODE_PORT,
        help=f"port of the nodes named without one (default {NODE_PORT})",
    )
    parser.add_argument(
        "--check",
        nargs="?",
        const="",
        default=None,
        metavar="HOST[:PORT]",
        help="do not serve: ask the scheduler running at HOST[:PORT] (default: "
        "127.0.0.1 on --port) how it is, as a monitoring check, proving the node "
        "secret (--node_secret_file or DISPYNB_SECRET); prints one line and exits "
        "0, 1 (no node up), 2 (not reachable, refused) or 3 (the check cannot "
        "run: an address that is no HOST[:PORT], an unreadable secret)",
    )
    parser.add_argument(
        "-i",
        "--host",
        *both_spellings("ip_addr"),
        action="append",
        default=[],
        metavar="ADDRESS",
        help="interface clients connect to (repeat it; default 127.0.0.1); "
        "discovery pings leave from the first one not on loopback",
    )
    parser.add_argument(
        "-p",
        "--port",
        *both_spellings("scheduler_port"),
        type=int,
        default=SCHEDULER_PORT,
        help=f"port clients connect to (default {SCHEDULER_PORT}; 0: a free one)",
    )
    parser.add_argument(
        *both_spellings("ipv4_udp_multicast"),
        action="store_true",
        help="discover nodes with dispy's IPv4 multicast group, not broadcast",
    )
    parser.add_argument(
        *both_spellings("ping_interval"),
        type=float,
        default=None,
        help="seconds between discovery pings (1-1000; default, or 0 as for "
        "dispyscheduler: once, at start: nodes announce themselves when they start)",
    )
    parser.add_argument(
        "--users",
        required=False,
        default="",
        metavar="FILE",
        help="the users file (written by 'user add')",
    )
    parser.add_argument(
        *both_spellings("node_secret_file"),
        metavar="FILE",
        default=None,
        help="file holding the nodes' secret (or DISPYNB_SECRET, or "
        "DISPYNB_SECRET_FILE naming such a file, as the guides do)",
    )
    parser.add_argument(
        *both_spellings("node_secret"),
        default=None,
        help="the nodes' secret (in the process list until the scheduler masks it, "
        "as it starts: prefer --node_secret_file)",
    )
    parser.add_argument(
        *both_spellings("node_cafile"),
        default=None,
        metavar="FILE",
        help="CA certificate of nodes that use TLS (their certificate is checked)",
    )
    parser.add_argument(
        *both_spellings("node_certfile"),
        default=None,
        metavar="FILE",
        help="the scheduler's certificate towards nodes that use TLS (and ask for "
        "one); also turns TLS on towards the nodes",
    )
    parser.add_argument(
        *both_spellings("node_keyfile"),
        default=None,
        metavar="FILE",
        help="key of --node_certfile (if not in that file)",
    )
    parser.add_argument(
        *both_spellings("cluster_certfile"),
        default=None,
        metavar="FILE",
        help="serve clients over TLS with this certificate (clients give "
        "SharedJobCluster(..., cafile=) or certfile=)",
    )
    parser.add_argument(
        *both_spellings("cluster_keyfile"),
        default=None,
        metavar="FILE",
        help="key of --cluster_certfile (if not in that file)",
    )
    parser.add_argument(
        "--httpd",
        action="store_true",
        help="start the operator's web monitor (nodes, clients, jobs; revoking a "
        "user); its URL with the access token is printed on the terminal (never "
        "logged), or the token is in --httpd_token_file",
    )
    parser.add_argument(
        *both_spellings("httpd_host"),
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address of the web monitor (default 127.0.0.1; another one needs "
        "--httpd_certfile)",
    )
    parser.add_argument(
        *both_spellings("httpd_port"),
        type=int,
        default=8181,
        help="port of the web monitor (default 8181, dispy's; 0: a free one)",
    )
    parser.add_argument(
        *both_spellings("httpd_certfile"),
        default=None,
        metavar="FILE",
        help="serve the web monitor over HTTPS with this certificate",
    )
    parser.add_argument(
        *both_spellings("httpd_keyfile"),
        default=None,
        metavar="FILE",
        help="key of --httpd_certfile (if not in that file)",
    )
    parser.add_argument(
        *both_spellings("httpd_token_file"),
        default=None,
        metavar="FILE",
        help="the web monitor's access token: read from FILE (mode 600), or a new "
        "one written there if it does not exist (default: a new one each start)",
    )
    parser.add_argument(
        "--cpus", type=int, default=None, help="use at most this many CPUs of each node"
    )
    parser.add_argument(
        *both_spellings("jobs_per_cpu"),
        type=int,
        default=32,
        help="jobs in flight per node CPU at most while one user has jobs (fewer "
        "for long jobs; default 32); always 1 while several users do (fairness)",
    )
    parser.add_argument(
        *both_spellings("max_cpus"),
        type=int,
        default=None,
        help="quota: jobs running at once per user",
    )
    parser.add_argument(
        *both_spellings("max_queued"),
        type=int,
        default=None,
        help="quota: jobs waiting at the scheduler per user",
    )
    parser.add_argument(
        *both_spellings("exclusive_users"),
        default="none",
        metavar="WHO",
        help="who may run exclusive clusters (SharedJobCluster(exclusive=True): "
        "every other user's jobs wait until it closes): all (dispyscheduler's "
        "rule), none, or user names separated by commas (alice,bob); default none: "
        "another user's exclusive cluster runs shared with the others, its client "
        "warned and told to ask for this option",
    )
    parser.add_argument(
        *both_spellings("pulse_interval"),
        type=float,
        default=1.0,
        help="seconds between pings to nodes and reports to clients (default 1; "
        "0, dispyscheduler's default, is 1 too)",
    )
    parser.add_argument(
        *both_spellings("zombie_interval"),
        type=float,
        default=60.0,
        help="minutes (fractions too: 0.5 is 30 s) a client may stay silent (it "
        "pings every pulse) before it counts as a zombie: its computations are "
        "closed, its jobs terminated; also the longest the results of a client that "
        "went away (with a recover_file) are kept (default 60; 0: never, as for "
        "dispyscheduler)",
    )
    parser.add_argument(
        *both_spellings("forget_registered"),
        type=float,
        default=60.0,
        help="seconds a node that registered itself (--register_port) may stay "
        "unreachable before it is forgotten: it registers again when it is back, "
        "perhaps on another port (1-86400; default 60; named nodes are kept)",
    )
    parser.add_argument(
        *both_spellings("msg_timeout"),
        type=float,
        default=None,
        help="dispy's MsgTimeout: connecting to a node may take this long, a "
        "node's or client's handshake half of it (default 10)",
    )
    parser.add_argument(
        *both_spellings("keep_results"),
        type=float,
        default=3600.0,
        help="seconds results wait for a client that went away (with a "
        "recover_file; default 3600), and no longer than what is left of "
        "--zombie_interval since it was last heard from",
    )
    parser.add_argument(
        *both_spellings("dest_path_prefix"),
        default=None,
        metavar="DIR",
        help="where results kept for clients that went away spill to disk (a "
        "private directory in it, removed on exit; default "
        f"{SchedulerConfig().dest_path_prefix})",
    )
    parser.add_argument(
        *both_spellings("kept_memory"),
        type=parse_size,
        default=SchedulerConfig.kept_memory,
        metavar="SIZE",
        help="bytes of kept results, their output included, held in memory in "
        "all (the rest spill to disk; default 32M)",
    )
    parser.add_argument(
        *both_spellings("max_kept"),
        type=parse_size,
        default=SchedulerConfig.max_kept,
        metavar="SIZE",
        help="quota: bytes of results (output included) one computation may have "
        "kept while its client is away (default 1G); past it a job's result is "
        "replaced by an error saying so and its other jobs wait for the client, or "
        "until the client's acknowledgements bring it back under the quota",
    )
    parser.add_argument(
        *both_spellings("max_user_kept"),
        type=parse_size,
        default=SchedulerConfig.max_user_kept,
        metavar="SIZE",
        help="quota: bytes one user may hold on the scheduler's disk in all: the "
        "results kept for its computations and sessions, and the files it sent "
        "(depends, send_file) together (default 4G, 0: no limit), so that one user "
        "cannot fill the disk under --dest_path_prefix that the others' kept results "
        "and files need; past it results are dropped as past --max_kept and files "
        "refused, the error naming this option",
    )
    parser.add_argument(
        *both_spellings("max_user_args"),
        type=parse_size,
        default=SchedulerConfig.max_user_args,
        metavar="SIZE",
        help="quota: bytes one user may have in the scheduler's memory at once: "
        "its computations' functions and setups (the files they list) and its "
        "jobs' arguments and own files, queued or running, each buffer and file "
        "counted with its objects (default 1G, 0: no limit); past it a client's "
        "jobs, or a cluster's setup, "
        "are refused with an error naming this option",
    )
    parser.add_argument(
        *both_spellings("max_file_size"),
        type=parse_size,
        default=SchedulerConfig.max_file_size,
        metavar="SIZE",
        help="bytes a file a client sends (depends, send_file) may have at most "
        "(default 512M, 0: no limit); kept on disk while its computation lives, "
        "within its user's --max_user_kept",
    )
    parser.add_argument(
        *both_spellings("max_computations"),
        type=int,
        default=SchedulerConfig.max_computations,
        metavar="N",
        help="quota: computations (clusters) one user may have at once (each "
        "holds a connection and worker processes on every node; default 16, 0: no "
        "limit)",
    )
    parser.add_argument(
        *both_spellings("max_sessions"),
        type=int,
        default=SchedulerConfig.max_sessions,
        metavar="N",
        help="quota: sessions (client connections: a cluster holds one) one user "
        "may have open at once (each holds one of the scheduler's descriptors; "
        "default 32, 0: no limit)",
    )
    parser.add_argument(
        *both_spellings("max_files"),
        type=int,
        default=SchedulerConfig.max_files,
        metavar="N",
        help="quota: files one user may have kept at once (each holds a "
        "descriptor; default 0: an eighth of the scheduler's descriptor limit)",
    )
    parser.add_argument(
        *both_spellings("port_file"),
        default="",
        help="write the port here once listening",
    )
    parser.add_argument(
        "--daemon",
        action="store_true",
        help="accepted for dispy: the scheduler never reads stdin",
    )
    parser.add_argument(
        *both_spellings("poll_interval"),
        type=float,
        default=None,
        metavar="SECONDS",
        help="accepted for dispyscheduler 3.15 to 4.2, which polled nodes for job "
        "results: this scheduler keeps a connection to each node, nothing to poll",
    )
    parser.add_argument(
        *both_spellings("fair_cluster_scheduler"),
        action="store_true",
        help="dispyscheduler's choice of its fair scheduler: accepted, this "
        "scheduler always shares the nodes' CPUs fairly between users",
    )
    parser.add_argument(
        "--clean",
        action="store_true",
        help="remove what a killed scheduler left under --dest_path_prefix",
    )
    parser.add_argument("-d", "--debug", action="store_true", help="log level debug")
    parser.add_argument(
        "--loglevel",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    for name in REFUSED:
        parser.add_argument(
            *both_spellings(name),
            nargs="?",
            const=True,
            default=None,
            metavar="VALUE",
            help=f"dispyscheduler's; refused: {REFUSED[name]}",
        )
    parser.add_argument(
        "--version", action="version", version=version_line("dispynb-scheduler")
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` after the options of its ``--config`` file (``argv`` wins);
    with ``--save_config``, write them and exit."""
    from schedserver.cliconfig import config_argv

    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    given = list(argv)
    if first.config:
        try:
            given = config_argv(parser, first.config) + given
        except ValueError as exc:
            parser.exit(2, f"dispynb-scheduler: {exc}\n")
    args = parser.parse_args(given)
    # A secret read from the config file is not in the process list.
    args.node_secret_in_config = bool(
        args.node_secret and args.node_secret != first.node_secret
    )
    if args.save_config:
        save_config_and_exit(
            parser,
            args,
            "not --node_secret: use --node_secret_file or DISPYNB_SECRET",
            _NOT_SAVED,
        )
    return args


#: Options ``--save_config`` never writes.
_NOT_SAVED = frozenset({"node_secret"})


__all__ = ["REFUSED", "both_spellings", "build_parser", "parse_args"]
