"""The ``dispynb-node`` command: parse options, run a `NodeServer` until a signal."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable

from dispynb._version import __version__
from dispynb.defaults import (
    DISCOVERY_PORT,
    IPV4_MULTICAST_GROUP,
    MAX_MESSAGE_SIZE,
    NODE_PORT,
)
from dispynb.errors import ConfigurationError, DispynbError
from dispynb.secret import resolve_secret, write_new_secret
from nodeserver.cliconfig import add_refused, config_argv, save_config
from nodeserver.config import (
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_TRANSFER_QUOTA,
    NodeConfig,
)
from nodeserver.memory import keep_freed_memory
from nodeserver.server import NodeServer
from nodeserver.service import Phase, ServiceWindow, keep_window, parse_time

logger = logging.getLogger("nodeserver")

#: Seconds between checks that the parent of an ``--exit-with-parent`` node lives.
PARENT_CHECK_INTERVAL = 1.0

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
    parser = argparse.ArgumentParser(
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
        metavar="FILE",
        help="write the options given to FILE (mode 600; never a --secret) and exit",
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
        help="shared secret (visible in the process list: prefer DISPYNB_SECRET or "
        "--secret-file)",
    )
    add(
        "--secret-file",
        "--secret_file",
        dest="secret_file",
        default=None,
        help="file holding the shared secret (mode 600)",
    )
    add(
        "--new-secret",
        metavar="FILE",
        default=None,
        help="write a new random secret (256 bits) to FILE, created with mode 600 "
        "(never overwritten), and use it; give clients the same file",
    )
    add("--certfile", default=None, help="TLS certificate (PEM); enables TLS")
    add("--keyfile", default=None, help="TLS private key (PEM), if not in --certfile")
    add("--cafile", default=None, help="CA to verify client certificates (mutual TLS)")
    add(
        "--dest-path",
        "--dest_path",
        "--dest_path_prefix",
        dest="dest_path",
        default=None,
        help="directory for computations' files (default: <tmp>/dispynb)",
    )
    add("--clean", action="store_true", help="empty the destination directory at start")
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
        help="bytes of files one computation (client connection) may send in all; "
        "0: no limit (default 4G)",
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
        "--port-file", default=None, help="write the bound port to this file when ready"
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
        help="on SIGTERM, seconds running jobs may finish before they are "
        "terminated (default 30; 0: at once); a second SIGTERM/SIGINT terminates "
        "them at once. Jobs that did not start go back to their clients",
    )
    add(
        "--discovery",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="answer clients' UDP discovery pings and announce this node (default: "
        "on, as dispynode, unless the node listens on loopback only)",
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
        help="also announce the node every SECONDS (default 0: at start and stop)",
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
        help="seconds a connecting client gets to authenticate (default 5)",
    )
    add(
        "--daemon",
        action="store_true",
        help="accepted for dispynode scripts: dispynb-node never reads stdin",
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
    add("-d", "--debug", action="store_true", help="log level debug")
    add(
        "--loglevel",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    add_refused(parser)
    add("--version", action="version", version=f"dispynb-node {__version__}")
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
    if args.save_config and args.new_secret:
        parser.error(
            "--new-secret is not saved in a configuration: make the secret first "
            "(dispynb secret FILE) and save --secret-file FILE"
        )
    if args.save_config:
        left_out = save_config(parser, args, args.save_config)
        note = " (not the secret: use DISPYNB_SECRET or --secret-file)"
        print(f"saved to {args.save_config}{note if left_out else ''}")
        raise SystemExit(0)
    return args


def _default_hosts(args: argparse.Namespace, secret: bytes | None) -> list[str]:
    if args.hosts:
        return list(dict.fromkeys(args.hosts))
    if secret or args.certfile:
        return ["0.0.0.0"]
    logger.warning(
        "no secret or TLS: serving this machine only (127.0.0.1). dispynode would "
        "serve anyone on the network unauthenticated; dispynb does not. To serve "
        "other machines set DISPYNB_SECRET (or --secret-file, or --certfile)"
    )
    return ["127.0.0.1"]


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Turn parsed options into a validated `NodeConfig`."""
    if args.secret:
        logger.warning(
            "--secret is visible to other users in the process list; "
            "prefer --secret-file or DISPYNB_SECRET"
        )
    if args.ext_host and len(args.ext_host) > 1:
        raise ConfigurationError(
            "give one --ext-host: dispynb-node announces one address for clients to "
            "connect to (start one node per address otherwise)"
        )
    if args.new_secret:
        if args.secret or args.secret_file:
            raise ConfigurationError(
                "--new-secret makes the secret: drop --secret / --secret-file"
            )
        write_new_secret(args.new_secret)
        logger.warning(
            "wrote a new secret to %s: give clients the same file (secret_file= or "
            "DISPYNB_SECRET_FILE)",
            args.new_secret,
        )
        args.secret_file = args.new_secret
    secret = resolve_secret(args.secret, args.secret_file)
    hosts = _default_hosts(args, secret)
    orphan_timeout = args.orphan_timeout
    if args.zombie_interval is not None:
        if args.zombie_interval < 0:
            raise ConfigurationError("--zombie_interval must be 0 (never) or positive")
        orphan_timeout = args.zombie_interval * 60
    window = None
    if args.service_start or args.service_stop or args.service_end:
        window = ServiceWindow(args.service_start, args.service_stop, args.service_end)
    config = NodeConfig(
        host=hosts[0],
        more_hosts=hosts[1:],
        port=args.port,
        cpus=args.cpus,
        secret=secret,
        certfile=args.certfile,
        keyfile=args.keyfile,
        cafile=args.cafile,
        clean=args.clean,
        force_cleanup=args.force_cleanup,
        max_file_size=args.max_file_size,
        transfer_quota=args.transfer_quota,
        max_message_size=args.max_message_size,
        port_file=args.port_file,
        orphan_timeout=orphan_timeout,
        drain_timeout=args.drain_timeout,
        kept_results_size=args.kept_results_size,
        discovery=args.discovery,
        discovery_port=args.discovery_port,
        ipv4_multicast=args.ipv4_multicast,
        ext_host=args.ext_host[0] if args.ext_host else None,
        serve=args.serve,
        service_window=window,
        client_shutdown=args.client_shutdown,
        announce_interval=args.ping_interval,
    )
    if args.msg_timeout is not None:
        config.handshake_timeout = args.msg_timeout
    if args.name:
        config.name = args.name
    if args.dest_path:
        config.dest_path = os.path.abspath(args.dest_path)
    config.validate()
    return config


async def _stop_when_orphaned(
    parent: int, orphaned: asyncio.Event, stop: asyncio.Event
) -> None:
    # A killed parent cannot tell us; its pid changing (re-parenting) can.
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_CHECK_INTERVAL)
    logger.warning("the process that started this node exited; stopping")
    orphaned.set()
    stop.set()


def _stop_at_eof(
    fd: int, orphaned: asyncio.Event, stop: asyncio.Event
) -> Callable[[], None]:
    """Watch ``fd`` (a pipe whose write end the parent holds); stop at its EOF.

    Returns the function that stops watching."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # nothing is ever written; only the end of file matters
        loop.remove_reader(fd)
        logger.warning("the process that started this node exited; stopping")
        orphaned.set()
        stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)

    def unwatch() -> None:
        loop.remove_reader(fd)

    return unwatch


async def serve(
    config: NodeConfig, watch_parent: bool = False, parent_pipe: int | None = None
) -> None:
    """Run a node until SIGTERM or SIGINT (or its parent exits), then stop cleanly.

    The first signal drains (running jobs get ``config.drain_timeout`` seconds), a
    second one terminates the running jobs at once. A node whose parent exited stops
    at once: nobody is left to collect results. ``--serve N`` stops after N clients,
    a service window opens and closes the node each day.
    """
    server = NodeServer(config)
    stop = asyncio.Event()
    now = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            now.set()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    window = config.service_window
    serving = True
    if window is not None:
        phase, until = window.phase_at(datetime.datetime.now())
        serving = phase is Phase.SERVING
        if not serving:
            logger.info(
                "outside its service window: not serving until %s",
                until.strftime("%H:%M"),
            )
    await server.start(listen=serving)
    tasks = [
        asyncio.create_task(_wait_and_set(server.served_all, stop)),
        asyncio.create_task(_wait_and_set(server.shutdown_requested, stop)),
    ]
    orphaned = asyncio.Event()
    if watch_parent:
        tasks.append(
            asyncio.create_task(_stop_when_orphaned(os.getppid(), orphaned, stop))
        )
    if parent_pipe is not None:
        unwatch = _stop_at_eof(parent_pipe, orphaned, stop)
    if window is not None:
        tasks.append(asyncio.create_task(keep_window(server, window)))
    if config.announce_interval:
        tasks.append(asyncio.create_task(_announce_every(server, config)))
    await stop.wait()
    if parent_pipe is not None:
        unwatch()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if server.served_all.is_set():
        logger.info("served %d clients (--serve): shutting down", config.serve)
    else:
        logger.info("shutting down")
    await server.stop(0.0 if orphaned.is_set() else config.drain_timeout, now)


async def _wait_and_set(event: asyncio.Event, stop: asyncio.Event) -> None:
    await event.wait()
    stop.set()


async def _announce_every(server: NodeServer, config: NodeConfig) -> None:
    while True:
        await asyncio.sleep(config.announce_interval)
        server.announce()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dispynb-node`` and ``python -m nodeserver``."""
    args = parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(
        level="DEBUG" if args.debug else args.loglevel.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        config = config_from_args(args)
        if config.clean and os.path.isdir(config.dest_path):
            shutil.rmtree(config.dest_path, ignore_errors=True)
            logger.info("--clean: removed %s", config.dest_path)
        if config.serve == 0:
            logger.info("--serve 0: nothing to serve")
            return 0
        asyncio.run(serve(config, args.exit_with_parent, args.parent_pipe))
    except ConfigurationError as exc:
        print(f"dispynb-node: {exc}", file=sys.stderr)
        return 2
    except DispynbError as exc:
        print(f"dispynb-node: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dispynb-node: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
