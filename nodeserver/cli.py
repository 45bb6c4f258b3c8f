"""The ``dispynb-node`` command: parse options, run a `NodeServer` until a signal."""

from __future__ import annotations

import argparse
import asyncio
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
from dispynb.secret import resolve_secret
from nodeserver.config import NodeConfig
from nodeserver.memory import keep_freed_memory
from nodeserver.server import NodeServer

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


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``dispynb-node``."""
    parser = argparse.ArgumentParser(
        prog="dispynb-node",
        description="Run jobs of authenticated dispynb clients on this machine.",
    )
    add = parser.add_argument
    add(
        "-c",
        "--cpus",
        type=int,
        default=0,
        help="CPUs to use; 0 (default) = all, negative = all but that many",
    )
    add(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; others need a secret or TLS)",
    )
    add(
        "-p",
        "--port",
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
        help="shared secret (visible in the process list: prefer --secret-file)",
    )
    add("--secret-file", default=None, help="file holding the shared secret (mode 600)")
    add("--certfile", default=None, help="TLS certificate (PEM); enables TLS")
    add("--keyfile", default=None, help="TLS private key (PEM), if not in --certfile")
    add("--cafile", default=None, help="CA to verify client certificates (mutual TLS)")
    add(
        "-d",
        "--dest-path",
        "--dest_path",
        dest="dest_path",
        default=None,
        help="directory for computations' files (default: <tmp>/dispynb)",
    )
    add("--clean", action="store_true", help="empty the destination directory at start")
    add(
        "--max-file-size",
        "--max_file_size",
        dest="max_file_size",
        type=parse_size,
        default=0,
        help="largest file a client may send, e.g. 100M (default: no limit)",
    )
    add(
        "--max-message-size",
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
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds running jobs may finish before they are "
        "terminated (default 30; 0: at once); a second SIGTERM/SIGINT terminates "
        "them at once. Jobs that did not start go back to their clients",
    )
    add(
        "--discovery",
        action="store_true",
        help="answer clients' UDP discovery pings and announce this node when it "
        "starts (off by default: clients then name this node)",
    )
    add(
        "--discovery-port",
        type=int,
        default=DISCOVERY_PORT,
        help=f"UDP port for discovery pings (default {DISCOVERY_PORT}; clients hear "
        "announcements on the next port)",
    )
    add(
        "--ext-host",
        "--ext_host",
        dest="ext_host",
        default=None,
        help="address (or name) announced for clients to connect to instead of the "
        "one discovery datagrams come from: for nodes behind NAT or with several "
        "addresses (needs --discovery; clients use it only if it fits one of their "
        "node specs narrower than '*')",
    )
    add(
        "--ipv4-multicast",
        action="store_true",
        help=f"also answer pings sent to multicast group {IPV4_MULTICAST_GROUP} "
        "(implies --discovery)",
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
        "--loglevel",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    add("--version", action="version", version=f"dispynb-node {__version__}")
    return parser


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Turn parsed options into a validated `NodeConfig`."""
    if args.secret:
        logger.warning(
            "--secret is visible to other users in the process list; "
            "prefer --secret-file or DISPYNB_SECRET"
        )
    config = NodeConfig(
        host=args.host,
        port=args.port,
        cpus=args.cpus,
        secret=resolve_secret(args.secret, args.secret_file),
        certfile=args.certfile,
        keyfile=args.keyfile,
        cafile=args.cafile,
        clean=args.clean,
        max_file_size=args.max_file_size,
        max_message_size=args.max_message_size,
        port_file=args.port_file,
        orphan_timeout=args.orphan_timeout,
        drain_timeout=args.drain_timeout,
        kept_results_size=args.kept_results_size,
        discovery=args.discovery or args.ipv4_multicast,
        discovery_port=args.discovery_port,
        ipv4_multicast=args.ipv4_multicast,
        ext_host=args.ext_host,
    )
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
    at once: nobody is left to collect results.
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
    await server.start()
    orphaned = asyncio.Event()
    if watch_parent:
        parent = os.getppid()
        task = asyncio.create_task(_stop_when_orphaned(parent, orphaned, stop))
    if parent_pipe is not None:
        unwatch = _stop_at_eof(parent_pipe, orphaned, stop)
    await stop.wait()
    if watch_parent:
        task.cancel()
    if parent_pipe is not None:
        unwatch()
    logger.info("shutting down")
    await server.stop(0.0 if orphaned.is_set() else config.drain_timeout, now)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dispynb-node`` and ``python -m nodeserver``."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(
        level=args.loglevel.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        config = config_from_args(args)
        if config.clean and os.path.isdir(config.dest_path):
            shutil.rmtree(config.dest_path, ignore_errors=True)
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
