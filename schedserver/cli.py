"""The ``dispynb-scheduler`` command: run the shared scheduler, or manage its users.

``dispynb-scheduler -n NODE ... --users FILE`` serves (without ``-n``, or with
``-n '*'`` or another pattern, it discovers nodes as dispyscheduler does);
``dispynb-scheduler user add NAME --users FILE`` issues a credential, ``user revoke
NAME`` withdraws it. The options of dispy's ``dispyscheduler`` are accepted under
their names (and their older ones: ``--ip_addr``, ``--nodes``...), its configuration
files too (``--config``, ``--save_config``: `schedserver.cliconfig`); those that have
no meaning here are refused with one line that says why. Its options are
`schedserver.parser`'s.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from typing import TYPE_CHECKING

from dispynb.daemon import run_daemon, set_dumpable, setup_logging
from dispynb.defaults import SCHEDULER_PORT
from dispynb.errors import ConfigurationError, DispynbError
from dispynb.startup import StartupSignals, loop_handles_stop_signals, run_held
from nodeserver.cliconfig import refuse_readable_secret
from schedserver.parser import REFUSED, both_spellings, build_parser, parse_args

# The server, its configuration and TLS are imported where they are used: an
# administrator's 'user add', '--help' or '--version' loads none of them.
if TYPE_CHECKING:
    from schedserver.config import SchedulerConfig

logger = logging.getLogger("schedserver")


def config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    """Turn parsed options into a validated `SchedulerConfig`."""
    from dispynb.node import is_wildcard, parse_node_specs
    from dispynb.secret import resolve_secret
    from dispynb.transport.addressing import parse_address
    from dispynb.transport.tls import client_context, server_context
    from schedserver.config import SchedulerConfig, parse_exclusive_users

    for name, why in REFUSED.items():
        if getattr(args, name) is not None:
            raise ConfigurationError(f"--{name} is not supported: {why}")
    if args.node_secret and getattr(args, "node_secret_in_config", False):
        refuse_readable_secret(args.config, "node_secret")
    elif args.node_secret:
        logger.warning(
            "--node_secret was visible in the process list while the scheduler "
            "started (it shows *** now); prefer --node_secret_file or DISPYNB_SECRET"
        )
    secret = resolve_secret(args.node_secret, args.node_secret_file)
    nodes: list[tuple[str, int]] = []
    discover: list[str] = []
    for spec in args.node or ([] if args.register_port is not None else ["*"]):
        try:
            wildcard = is_wildcard(parse_node_specs(spec)[0])
        except (ConfigurationError, IndexError):
            raise ConfigurationError(
                f"-n {spec!r}: give a node as HOST[:PORT], or a pattern such as '*'"
            ) from None
        if wildcard:
            discover.append(spec)
            continue
        nodes.append(parse_address(spec, args.node_port))
    # 0 is dispyscheduler's default for both ("not given", as its config files
    # say): pings once at start, pulses at the default pace.
    ping_interval = args.ping_interval or None
    pulse_interval = args.pulse_interval or SchedulerConfig.pulse_interval
    if ping_interval is not None and not 1 <= ping_interval <= 1000:
        raise ConfigurationError(
            "--ping_interval must be within 1-1000 s (0: once, at start)"
        )
    if args.node_keyfile and not args.node_certfile:
        raise ConfigurationError("--node_keyfile needs --node_certfile")
    if args.cluster_keyfile and not args.cluster_certfile:
        raise ConfigurationError("--cluster_keyfile needs --cluster_certfile")
    node_tls = args.node_cafile or args.node_certfile
    config = SchedulerConfig(
        hosts=list(dict.fromkeys(args.host)) or ["127.0.0.1"],
        port=args.port,
        nodes=nodes,
        discover=discover,
        multicast=args.ipv4_udp_multicast,
        register_port=args.register_port,
        ping_interval=ping_interval,
        node_secret=secret,
        node_ssl=client_context(
            args.node_certfile, args.node_keyfile, args.node_cafile, "--node_keyfile"
        )
        if node_tls
        else None,
        client_ssl=server_context(
            args.cluster_certfile, args.cluster_keyfile, None, "--cluster_keyfile"
        )
        if args.cluster_certfile
        else None,
        httpd=args.httpd,
        httpd_host=args.httpd_host,
        httpd_port=args.httpd_port,
        httpd_certfile=args.httpd_certfile,
        httpd_keyfile=args.httpd_keyfile,
        httpd_token_file=args.httpd_token_file,
        users_file=args.users,
        cpus=args.cpus,
        jobs_per_cpu=args.jobs_per_cpu,
        max_cpus=args.max_cpus,
        max_queued=args.max_queued,
        exclusive_users=parse_exclusive_users(args.exclusive_users),
        pulse_interval=pulse_interval,
        # 0: never, as for dispyscheduler (and dispynb-node).
        zombie_interval=args.zombie_interval * 60.0
        if args.zombie_interval
        else math.inf,
        forget_registered=args.forget_registered,
        keep_results=args.keep_results,
        port_file=args.port_file,
        kept_memory=args.kept_memory,
        max_kept=args.max_kept,
        max_user_kept=args.max_user_kept,
        max_user_args=args.max_user_args,
        max_file_size=args.max_file_size,
        max_files=args.max_files,
        max_computations=args.max_computations,
        max_sessions=args.max_sessions,
        clean=args.clean,
    )
    if args.msg_timeout is not None:
        config.msg_timeout = args.msg_timeout
    if args.dest_path_prefix:
        config.dest_path_prefix = args.dest_path_prefix
    config.validate()
    return config


async def serve(config: SchedulerConfig, held: StartupSignals | None = None) -> None:
    """Run the scheduler until SIGTERM, SIGINT or SIGHUP (`stop_signals`); one
    ``held`` recorded as the loop started stops it as one now does."""
    import asyncio

    from schedserver.server import SchedulerServer

    server = SchedulerServer(config)
    stop = asyncio.Event()
    signalled: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        signalled.append(sig.name)
        stop.set()

    # Before it starts: a signal as soon as its port file is written (systemd's
    # stop, a test) stops it cleanly, not by the signal's default action.
    give_back_signals = loop_handles_stop_signals(loop, on_signal, held)
    await server.start()
    try:
        await stop.wait()
    finally:
        logger.info("stopping%s", f" ({signalled[0]})" if signalled else "")
        await server.stop(signalled[0] if signalled else "")
        # The log's last line: it stopped, not killed or hung while stopping.
        logger.info("stopped%s", f" ({signalled[0]})" if signalled else "")
        give_back_signals()  # one more signal waits while the loop closes


def _check(args: argparse.Namespace) -> int:
    """``--check``: probe a running scheduler (`nodeserver.health`)."""
    from dispynb.secret import resolve_secret
    from dispynb.transport.addressing import format_address
    from dispynb.transport.tls import TlsOptions, client_context
    from nodeserver.health import UNKNOWN, check

    # TLS is on with the scheduler's own option (its --config gives it).
    check_tls = TlsOptions(
        "--cluster_certfile",
        "",
        "",
        who="",
        scheduler_fix="give the check the scheduler's --cluster_certfile (or its "
        "--config)",
    )

    hosts = [h for h in args.host if h not in ("0.0.0.0", "::", "")]
    address = args.check or format_address(
        hosts[0] if hosts else "127.0.0.1", args.port
    )
    try:
        secret = resolve_secret(args.node_secret, args.node_secret_file)
        # Encrypted when the scheduler uses TLS; the secret proves who answers.
        ssl_context = client_context() if args.cluster_certfile else None
    except (DispynbError, OSError) as exc:
        print(f"UNKNOWN - cannot check {address}: {exc}")
        return UNKNOWN
    status, line = check(
        address,
        secret=secret,
        ssl_context=ssl_context,
        kind="scheduler",
        default_port=SCHEDULER_PORT,
        tls_options=check_tls,
        secret_options="its node secret: --node_secret_file or DISPYNB_SECRET",
    )
    print(line, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dispynb-scheduler`` and ``python -m schedserver``: a stop
    signal before the scheduler serves ends it cleanly too (`dispynb.startup`)."""
    return run_held("dispynb-scheduler", lambda held: _main(argv, held))


def _main(given: list[str] | None, held: StartupSignals) -> int:
    command_line = given is None
    argv = sys.argv[1:] if given is None else given

    def run() -> int:
        if argv[:1] == ["user"]:
            from schedserver.usercmd import user_command

            return user_command(argv[1:])
        args = parse_args(argv)
        if command_line and args.node_secret:
            from dispynb.secret import hide_secret_argv

            # Out of the process list: its users are not to know the node secret.
            hide_secret_argv(tuple(both_spellings("node_secret")))
        if args.check is not None:
            return _check(args)
        # It holds the node secret and its users' credentials: other processes
        # of its user (a node's jobs, on this machine) are not to read them.
        set_dumpable(False)
        setup_logging(args.debug, args.loglevel)
        import asyncio

        config = config_from_args(args)
        held.check()  # a stop signal whose `StopSignal` got lost (`dispynb.startup`)
        held.hand_over()  # from now on recorded, for serve() to act on
        asyncio.run(serve(config, held))
        return 0

    return run_daemon("dispynb-scheduler", run)


__all__ = ["build_parser", "config_from_args", "main", "parse_args"]
