"""``dispynb run``: run a program on the nodes once per argument list (dispy's
``dispy_cmd.py``, with its options), then report each run and the nodes' status.

A lab's shell script that called ``dispy_cmd.py -f data.txt -a "1 2" -a 3 prog``
calls ``dispynb run -f data.txt -a "1 2" -a 3 prog`` instead. Like the rest of
`dispynb.cli`, importing this module loads only the standard library.

Contents
--------
add_parser
    Add the ``run`` command to the ``dispynb`` command's subparsers.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["add_parser"]

# dispy's status numbers, so that the command line need not import dispynb.job.
_FINISHED = 11
_STATUS_NAMES = {8: "Cancelled", 9: "Terminated", 10: "Abandoned"}


def add_parser(commands: Any) -> None:
    """Add ``run`` to ``commands`` (the ``dispynb`` parser's subparsers)."""
    run = commands.add_parser(
        "run",
        help="run a program on the nodes, once per -a (dispy's dispy_cmd.py)",
        description=(
            "Send PROGRAM (a file, or a name on PATH) and the -f files to the nodes and"
            " run it once per -a, whose words are its arguments; then print each run's"
            " exit code and output, and the nodes' status. Takes dispy_cmd.py's"
            " options. Exit status 0 if every run ended (whatever its exit code), 1 if"
            " one could not run. The nodes are found as by JobCluster: -n, or"
            " discovery on the local networks without it."
        ),
    )
    run.add_argument("program", help="the program to run (a path, or a name on PATH)")
    run.add_argument(
        "-a",
        dest="args",
        action="append",
        default=[],
        metavar="ARGS",
        help="the arguments of one run, split at blanks; repeat it for more runs "
        "(default: one run without arguments)",
    )
    run.add_argument(
        "-f",
        dest="depends",
        action="append",
        default=[],
        metavar="FILE",
        help="a file the program needs, sent to the nodes; repeat it",
    )
    run.add_argument(
        "-n",
        "--nodes",
        dest="nodes",
        action="append",
        default=[],
        metavar="NODE",
        help="a node (HOST or HOST:PORT, wildcards discover); repeat it",
    )
    run.add_argument(
        "-c",
        dest="cleanup",
        action="store_false",
        help="leave the files sent on the nodes when the runs are done",
    )
    run.add_argument("-d", "--debug", action="store_true", help="log debug messages")
    run.add_argument(
        "--ip_addr",
        "--host",
        dest="host",
        default=None,
        metavar="ADDRESS",
        help="this machine's address that discovery pings leave from",
    )
    run.add_argument(
        "--secret",
        default=None,
        help="the nodes' secret (in the process list until the command starts, "
        "then masked: prefer --secret-file or "
        "DISPYNB_SECRET)",
    )
    run.add_argument(
        "--secret-file",
        "--secret_file",
        dest="secret_file",
        default=None,
        metavar="FILE",
        help="file holding the nodes' secret, or with --scheduler_node the user's "
        "credential",
    )
    run.add_argument("--certfile", default=None, help="TLS certificate (PEM)")
    run.add_argument("--keyfile", default=None, help="TLS key (PEM)")
    run.add_argument("--cafile", default=None, help="CA that signed the nodes' certs")
    run.add_argument(
        "--scheduler_node",
        "--scheduler_host",
        dest="scheduler_host",
        default=None,
        metavar="HOST[:PORT]",
        help="run through the dispynb-scheduler there (SharedJobCluster)",
    )
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    """Run the program once per ``-a``; exit status 1 if a run could not run."""
    import logging

    from dispynb.cli import run_command

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    return run_command("run", lambda: _run_all(args))


def _run_all(args: argparse.Namespace) -> int:
    from dispynb import JobCluster, SharedJobCluster

    options: dict[str, Any] = {
        "depends": list(args.depends),
        "cleanup": args.cleanup,
        "host": args.host,
        "secret": args.secret,
        "secret_file": args.secret_file,
        "certfile": args.certfile,
        "keyfile": args.keyfile,
        "cafile": args.cafile,
    }
    options = {key: value for key, value in options.items() if value is not None}
    nodes = args.nodes or None
    runs = [words.split() for words in args.args] or [[]]
    if args.scheduler_host:
        cluster: Any = SharedJobCluster(
            args.program, nodes=nodes, scheduler_host=args.scheduler_host, **options
        )
    else:
        cluster = JobCluster(args.program, nodes=nodes, **options)
    with cluster:
        jobs = [cluster.submit_job_id(n, *words) for n, words in enumerate(runs, 1)]
        cluster.wait()
        for job, words in zip(jobs, runs, strict=True):
            _report(job, words)
        cluster.print_status()
    return 0 if all(job.status == _FINISHED for job in jobs) else 1


def _report(job: Any, words: Sequence[str]) -> None:
    """One run: its exit code (or why it did not end), then its output."""
    title = f"job {job.id} ({' '.join(words)})" if words else f"job {job.id}"
    if job.status != _FINISHED:
        status = _STATUS_NAMES.get(int(job.status), str(job.status))
        print(f"{title}: {status}: {(job.exception or '').strip()}")
    else:
        print(f"{title}: exit code {job.result}")
    for name, data in (("stdout", job.stdout), ("stderr", job.stderr)):
        if data:
            text = data.decode(errors="replace") if isinstance(data, bytes) else data
            print(f"  {name}:")
            for line in text.rstrip("\n").splitlines():
                print(f"    {line}")
