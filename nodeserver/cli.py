"""The ``dispynb-node`` command: parse options, run a `NodeServer` until a signal."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal

from dispynb.daemon import (
    log_level,
    run_daemon,
    set_dumpable,
    setup_logging,
)
from dispynb.errors import AuthenticationError, ConfigurationError, DispynbError
from dispynb.protocol.discovery import new_boot_id
from dispynb.protocol.framing import large_frames_taken, release_spares
from dispynb.secret import (
    hide_secret_argv,
    resolve_secret,
    withdraw_secret_env,
    write_new_secret,
)
from dispynb.startup import StartupSignals, loop_handles_stop_signals, run_held
from dispynb.transport.addressing import format_address, is_loopback
from dispynb.wording import counted
from nodeserver.cliconfig import refuse_readable_secret
from nodeserver.config import NodeConfig
from nodeserver.console import Console, wants_console
from nodeserver.containment import become_subreaper, probe_in_background
from nodeserver.destdir import remove_files, use_dest_path
from nodeserver.launcher import PROCESS_LAUNCHER, AdoptingLauncher, Launcher
from nodeserver.lifeline import (
    exit_without_client,
    register_and_stay,
    still_registered,
    stop_at_eof,
    stop_when_orphaned,
)
from nodeserver.memory import keep_freed_memory, release_freed_memory
from nodeserver.parser import build_parser, parse_args, parse_size
from nodeserver.register import CLIENT, REGISTER_PATIENCE, SCHEDULER
from nodeserver.server import NodeServer
from nodeserver.service import Phase, ServiceWindow, keep_window
from nodeserver.sharedbody import BODIES
from nodeserver.zygote import start_zygote

__all__ = ["build_parser", "config_from_args", "main", "parse_args", "parse_size"]

logger = logging.getLogger("nodeserver")

#: Seconds without a large message after which the node gives back the memory the
#: last ones left (bodies kept for reuse, freed heap): see `_release_memory_when_idle`.
MEMORY_RELEASE_INTERVAL = 2.0


def _me() -> str:
    """This process's user, for messages."""
    try:
        import pwd  # POSIX only, as nodes are

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def _default_hosts(args: argparse.Namespace, secret: bytes | None) -> list[str]:
    if args.hosts:
        return list(dict.fromkeys(args.hosts))
    if secret or args.cafile:
        return ["0.0.0.0"]
    logger.warning(
        "no secret (or client certificates): serving this machine only (127.0.0.1), "
        "and of its users %s only. dispynode would serve anyone on the network "
        "unauthenticated; dispynb does not. To serve other machines or users set "
        "DISPYNB_SECRET (or --secret-file, or --cafile with --certfile)",
        _me(),
    )
    return ["127.0.0.1"]


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Turn parsed options into a validated `NodeConfig`."""
    if args.secret and getattr(args, "secret_in_config", False):
        refuse_readable_secret(args.config, "secret")
    elif args.secret:
        logger.warning(
            "--secret was visible to other users in the process list while the "
            "node started (it shows *** now); prefer --secret-file or DISPYNB_SECRET"
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
    if args.secret_stdin:
        if args.secret or args.secret_file:
            raise ConfigurationError(
                "--secret-stdin reads the secret: drop --secret / --secret-file"
            )
        args.secret = _read_secret_line(0)
    # main() took DISPYNB_SECRET out of the environment that jobs inherit.
    env = {**os.environ, **getattr(args, "secret_env", {})}
    secret = resolve_secret(args.secret, args.secret_file, env)
    hosts = _default_hosts(args, secret)
    orphan_timeout = args.orphan_timeout
    if args.zombie_interval is not None:
        if args.zombie_interval < 0:
            raise ConfigurationError("--zombie_interval must be 0 (never) or positive")
        orphan_timeout = args.zombie_interval * 60
    discovery = args.discovery
    if discovery is None and not (secret or args.cafile):
        # Only this machine can reach a node without a secret (it listens on
        # loopback): answering pings sent to 127.0.0.1 costs nothing and lets a
        # client here without a secret (dispy's default) find it, as dispy's does.
        discovery = all(is_loopback(host) for host in hosts) or None
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
        file_cache_size=args.file_cache_size,
        max_message_size=args.max_message_size,
        port_file=args.port_file,
        unix_socket=args.unix_socket,
        orphan_timeout=orphan_timeout,
        drain_timeout=args.drain_timeout,
        kept_results_size=args.kept_results_size,
        discovery=discovery,
        discovery_port=args.discovery_port,
        ipv4_multicast=args.ipv4_multicast,
        ext_host=args.ext_host[0] if args.ext_host else None,
        serve=args.serve,
        service_window=window,
        client_shutdown=args.client_shutdown,
        announce_interval=args.ping_interval,
        exit_without_client=args.exit_without_client,
    )
    if args.msg_timeout is not None:
        config.handshake_timeout = args.msg_timeout
    if args.name:
        config.name = args.name
    if args.dest_path:
        config.dest_path = os.path.abspath(args.dest_path)
    config.validate()
    _warn_beyond_the_machine(args.cpus, config.cpus)
    return config


def _warn_beyond_the_machine(asked: int, cpus: int) -> None:
    """dispynode refuses ``-c`` over the machine's CPUs (or leaving none); say
    what dispynb-node does instead (at INFO: a LocalCluster asked for more CPUs
    than the machine has, at level WARNING, says nothing)."""
    available = os.cpu_count() or 1
    if asked > available or asked <= -available:
        logger.info(
            "--cpus %d: this machine has %s; this node runs up to %s at "
            "once (dispynode refuses it)",
            asked,
            counted(available, "CPU"),
            counted(cpus, "job"),
        )


def _read_secret_line(fd: int) -> bytes:
    """The first line of ``fd`` (unbuffered: the rest of the pipe stays unread)."""
    data = b""
    while not data.endswith(b"\n") and len(data) <= 4096:
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise ConfigurationError("--secret-stdin: standard input gave no secret")
    return secret


async def serve(
    config: NodeConfig,
    watch_parent: bool = False,
    parent_pipe: int | None = None,
    register_to: str | None = None,
    launcher: Launcher = PROCESS_LAUNCHER,
    register_patience: float | None = REGISTER_PATIENCE,
    failed: list[DispynbError] | None = None,
    held: StartupSignals | None = None,
    register_peer: str = CLIENT,
    commands: bool = False,
) -> bool:
    """Run a node until SIGTERM or SIGINT (or its parent exits), then stop cleanly;
    return whether it stopped because its parent exited.

    The first signal drains (running jobs get ``config.drain_timeout`` seconds), a
    second one terminates the running jobs at once. A node whose parent exited stops
    at once: nobody is left to collect results. ``--serve N`` stops after N clients,
    a service window opens and closes the node each day. With ``register_to``
    (``--register``) the node registers with that client once listening, and stops
    if it cannot within ``register_patience`` seconds (None: it waits for it, as
    for ``--scheduler_host``); once registered it keeps itself known to the client
    (`keep_registered`: a restarted scheduler finds it again). With
    ``config.exit_without_client`` it drains and stops once no client has been
    connected for that many seconds (its launcher's client died). A registration
    that failed (rejected, or no answer in time) is appended to ``failed``. A stop
    signal ``held`` recorded as the loop started stops the node as one now does.
    ``register_peer`` is what the log calls the client registered with. With
    ``commands`` (no ``--daemon``) it does the commands typed on its standard
    input (`nodeserver.console`): ``exit`` as the first signal, ``quit`` as a
    second one.
    """
    server = NodeServer(config, launcher)
    stop = asyncio.Event()
    now = asyncio.Event()
    loop = asyncio.get_running_loop()

    signalled: list[str] = []  # the first signal's name: clients are told

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            now.set()
        elif not signalled:
            signalled.append(signum.name)
        stop.set()

    give_back_signals = loop_handles_stop_signals(loop, on_signal, held)
    if isinstance(launcher, AdoptingLauncher):
        # Orphans are reaped as they exit; a killed zygote at once (and logged).
        launcher.watch()
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
    typed: list[str] = []  # the console command that stopped it

    def on_command(command: str, at_once: bool) -> None:
        if not stop.is_set():
            typed.append(command)
        if at_once:
            now.set()
        stop.set()

    console = Console(server, on_command) if commands and wants_console() else None
    if console is not None:
        console.start()
    probe_in_background()  # before a client's first computation needs it
    tasks = [
        asyncio.create_task(_wait_and_set(server.served_all, stop)),
        asyncio.create_task(_wait_and_set(server.shutdown_requested, stop)),
    ]
    orphaned = asyncio.Event()
    if watch_parent:
        tasks.append(
            asyncio.create_task(stop_when_orphaned(os.getppid(), orphaned, stop))
        )
    closed: list[bool] = []  # its launcher closed it (not a dead parent)
    if parent_pipe is not None:
        unwatch = stop_at_eof(parent_pipe, orphaned, stop, closed)
    if window is not None:
        tasks.append(asyncio.create_task(keep_window(server, window)))
    if config.announce_interval:
        tasks.append(asyncio.create_task(_announce_every(server, config)))
    tasks.append(asyncio.create_task(_release_memory_when_idle()))
    ready = asyncio.Event()
    boot = new_boot_id()
    if register_to is not None:
        tasks.append(
            asyncio.create_task(
                register_and_stay(
                    server,
                    config,
                    register_to,
                    stop,
                    ready,
                    boot,
                    register_patience,
                    [] if failed is None else failed,
                    register_peer,
                )
            )
        )
    else:
        ready.set()
    lonely: asyncio.Task[None] | None = None  # ends once no client came for long
    if config.exit_without_client:

        async def client_lives() -> bool:
            assert register_to is not None
            return await still_registered(
                server, config, register_to, boot, register_peer
            )

        watch = exit_without_client(
            server,
            config.exit_without_client,
            ready,
            stop,
            client_lives if register_to is not None else None,
            register_peer,
        )
        lonely = asyncio.create_task(watch)
        tasks.append(lonely)
    await stop.wait()
    if parent_pipe is not None:
        unwatch()
    await _cancel_all(tasks)
    if server.served_all.is_set():
        served = counted(config.serve, "client")
        logger.info("served %s (--serve): shutting down", served)
        why = f"--serve {config.serve}: it served its {served}"
    else:
        why = (
            f"{signalled[0]}"
            if signalled
            else f"{typed[0]!r} typed on its standard input"
            if typed
            else "its launcher closed it"
            if closed
            else "its parent process exited"
            if orphaned.is_set()
            else "a job called dispynode_shutdown()"
            if server.shutdown_requested.is_set()
            else "it could not register"
            if failed
            else f"no client for {config.exit_without_client:g} s, "
            "--exit-without-client"
            if lonely is not None and lonely.done() and not lonely.cancelled()
            else ""
        )
        # Which signal, as the scheduler says: systemd's stop, SLURM's, a Ctrl-C.
        logger.info("shutting down%s", f" ({why})" if why else "")
    await server.stop(0.0 if orphaned.is_set() else config.drain_timeout, now, why)
    # The log's last line (what a SLURM job's output ends with): it stopped, and
    # why, not killed or hung while stopping.
    logger.info("stopped%s", f" ({why})" if why else "")
    if console is not None:
        console.close()
    give_back_signals()  # one more signal waits while the loop closes
    return orphaned.is_set()


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for them to end, cancelling again those that go on.

    Python 3.11's `asyncio.wait_for` swallows a cancellation that comes as what it
    awaits completes (fixed in 3.12): a node stopped as its registration was
    accepted went on registering for ever, and stopped never (nor on SIGTERM)."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in tasks:  # what they raised was theirs to log; retrieved, as gather did
        if not task.cancelled():
            task.exception()


async def _release_memory_when_idle(
    interval: float = MEMORY_RELEASE_INTERVAL,
) -> None:
    """Give back what large messages left once none arrived for ``interval`` seconds:
    while they come, their bodies and the freed heap are reused (no page faults per
    message); afterwards an idle node would keep tens of megabytes for nothing."""
    seen = released = large_frames_taken() + BODIES.taken
    while True:
        await asyncio.sleep(interval)
        taken = large_frames_taken() + BODIES.taken
        if taken == seen and taken != released:
            kept = release_spares() + BODIES.release()
            release_freed_memory()
            released = taken
            logger.debug("idle: released %d bytes kept for large messages", kept)
        seen = taken


async def _wait_and_set(event: asyncio.Event, stop: asyncio.Event) -> None:
    await event.wait()
    stop.set()


async def _announce_every(server: NodeServer, config: NodeConfig) -> None:
    while True:
        await asyncio.sleep(config.announce_interval)
        server.announce()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dispynb-node`` and ``python -m nodeserver``: a stop signal
    before the node serves ends it cleanly too (`dispynb.startup`)."""
    return run_held("dispynb-node", lambda held: _main(argv, held))


def _main(argv: list[str] | None, held: StartupSignals) -> int:
    args = parse_args(argv)
    if argv is None and args.secret:
        # Out of the process list and of what the zygote and jobs inherit.
        hide_secret_argv()
    if args.check is not None:
        return _check(args)
    keep_freed_memory()
    # Jobs run as this user: they are not to read the secret in this process's
    # memory (/proc/PID/mem, environ) nor trace it. The zygote inherits it.
    set_dumpable(False)
    # Before the secret is read, logging is set up or any thread runs, and after
    # this module's imports: the node's modules are shared with the zygote too (a
    # zygote forked before them held 2 MB more of its own once the node ran). The
    # zygote forgets DISPYNB_SECRET itself (`forget_secret_env`): the processes it
    # forks run jobs, which are not to find the secret in their memory (a
    # scheduler's users are not to know the node secret).
    # Computation processes log as the node does (the zygote's are forked before
    # the node configures its logging).
    level = log_level(args.debug, args.loglevel)
    zygote = start_zygote(level) if args.serve != 0 else None
    held.check()  # a stop signal whose `StopSignal` got lost: before blocking
    # Before anything else is started: they must not inherit it either.
    args.secret_env = withdraw_secret_env()
    # Without a zygote, the node adopts orphans all the same (what a dead worker
    # or computation process left running comes back to it, to be swept).
    launcher = zygote or AdoptingLauncher(
        adopting=args.serve != 0 and become_subreaper(), log_level=level
    )
    setup_logging(args.debug, args.loglevel)

    left: list[NodeConfig] = []  # a node whose parent exited: its files to remove

    def run() -> int:
        config = config_from_args(args)
        use_dest_path(config.dest_path, config.clean, serving=config.serve != 0)
        if config.serve == 0:
            logger.info("--serve 0: nothing to serve")
            return 0
        if args.register and not config.secret:
            if args.scheduler_host:
                raise ConfigurationError(
                    f"{args.scheduler_option} needs a secret (--secret-file or "
                    "DISPYNB_SECRET, the scheduler's --node_secret_file): the "
                    "registration proves it. On one machine without a secret, leave "
                    "it out: the scheduler finds this node by discovery"
                )
            raise ConfigurationError(
                "--register needs a secret (--secret-stdin, --secret-file or "
                "DISPYNB_SECRET): the registration proves it"
            )
        failed: list[DispynbError] = []
        held.check()  # the last checkpoint before the loop handles them
        held.hand_over()  # from now on recorded, for serve() to act on
        orphaned = asyncio.run(
            serve(
                config,
                args.exit_with_parent,
                args.parent_pipe,
                args.register,
                launcher,
                # A scheduler's node waits for it (started later, or restarting);
                # a launcher's client is there first: 30 s, then the node stops.
                None if args.scheduler_host else REGISTER_PATIENCE,
                failed,
                held,
                SCHEDULER if args.scheduler_host else CLIENT,
                # Not a launcher's --parent-pipe 0 (ssh): its pipe, not a console.
                not args.daemon and args.parent_pipe != 0,
            )
        )
        if orphaned and args.remove_when_orphaned:
            left.append(config)
        # Not a success for a service manager: a rejected secret is a setting
        # that cannot work (2, not restarted), no client in time may pass (1).
        if failed:
            return 2 if isinstance(failed[0], AuthenticationError) else 1
        return 0

    try:
        return run_daemon("dispynb-node", run)
    finally:
        launcher.stop()  # reaped here: never a zombie left to whoever adopts it
        for config in left:  # once nothing of the node's runs in its directory
            remove_files(config)


def _check(args: argparse.Namespace) -> int:
    """``--check``: probe a running node (`nodeserver.health`), print one line."""
    from dispynb.transport.tls import TlsOptions, client_context  # the check only
    from nodeserver.health import UNKNOWN, check

    address = args.check
    if not address:
        hosts = [h for h in args.hosts or [] if h not in ("0.0.0.0", "::", "")]
        address = format_address(hosts[0] if hosts else "127.0.0.1", args.port)
    try:
        secret = (
            _read_secret_line(0)
            if args.secret_stdin
            else resolve_secret(args.secret, args.secret_file, dict(os.environ))
        )
        ssl_context = (
            client_context(args.certfile, args.keyfile, args.cafile, "--keyfile")
            if args.certfile or args.cafile
            else None
        )
    except (DispynbError, OSError) as exc:
        print(f"UNKNOWN - cannot check {address}: {exc}")
        return UNKNOWN
    timeout = args.msg_timeout or None
    # A TLS error names this command's options, not a Python client's keywords.
    options = TlsOptions("--cafile", "--certfile", "--keyfile", who="")
    secret_options = "--secret-file, --secret-stdin or DISPYNB_SECRET"
    status, line = (
        check(
            address,
            secret=secret,
            ssl_context=ssl_context,
            timeout=timeout,
            tls_options=options,
            secret_options=secret_options,
        )
        if timeout
        else check(
            address,
            secret=secret,
            ssl_context=ssl_context,
            tls_options=options,
            secret_options=secret_options,
        )
    )
    print(line, flush=True)
    return status
