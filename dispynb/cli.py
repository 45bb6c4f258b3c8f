"""The ``dispynb`` command line: ``dispynb demo``, ``run``, ``secret`` and ``version``.

Importing this module loads only the standard library (argparse and a few small
modules); the cluster machinery is imported when a command runs. That matters twice:
``dispynb version`` stays instant, and a node that unpickles `estimate_pi` by reference
imports this module without pulling in the client.

Contents
--------
main
    Entry point of the ``dispynb`` console script and of ``python -m dispynb``.
estimate_pi
    The demo's computation: one Monte Carlo estimate of pi.
ProgressLine
    A live progress line on stderr, fed by ``job_status`` callbacks.
run_command
    Run a command's body, saying dispynb's errors and Ctrl-C in one line.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from dispynb._interruptible import Flag

__all__ = ["ProgressLine", "estimate_pi", "main", "run_command"]

# dispy's final job statuses (DispyJob.Cancelled, Terminated, Abandoned, Finished) as
# plain numbers, so that this module need not import dispynb.job.
_FINAL_STATUSES = frozenset({8, 9, 10, 11})
_CANCELLED = 8
_FINISHED = 11

#: Rows of the demo's results table; the summary line covers every job.
_TABLE_ROWS = 10


def estimate_pi(seed: int, samples: int) -> tuple[int, str]:
    """Throw ``samples`` random points at the unit square; count those in the circle.

    The demo's computation: about 0.05 s of pure-Python work for 400,000 samples.
    It runs on a node, so it imports what it needs itself.

    Parameters
    ----------
    seed:
        Seed of this job's `random.Random`, so every job draws different points and a
        run can be reproduced.
    samples:
        Number of points.

    Returns
    -------
    tuple
        ``(hits, node)``: the points with ``x*x + y*y <= 1`` (so ``4 * hits / samples``
        estimates pi) and the name of the node that ran the job.
    """
    import random

    draw = random.Random(seed).random
    hits = 0
    for _ in range(samples):
        x = draw()
        y = draw()
        if x * x + y * y <= 1.0:
            hits += 1
    try:
        # Injected into the computation's globals by the node, as in dispy.
        node = dispy_node_name  # type: ignore[name-defined]
    except NameError:
        import socket

        node = socket.gethostname()
    return hits, str(node)


class ProgressLine:
    """A live ``[####......] 37/100 jobs  12.3 jobs/s`` line, redrawn per finished job.

    `job_status` is meant to be the cluster's ``job_status`` callback: it runs on the
    cluster's callback thread, so all state is guarded by a lock, and nothing polls.
    Redraws are throttled to one per ``interval`` seconds, except the last.

    Parameters
    ----------
    total:
        Number of jobs expected.
    stream:
        Where to draw; ``sys.stderr`` by default.
    width:
        Characters inside the brackets.
    interval:
        Least seconds between two redraws.

    Attributes
    ----------
    finished:
        Set once a final status has been seen for ``total`` jobs (a
        `dispynb._interruptible.Flag`: ``threading.Event``'s methods, and a wait
        on it that Ctrl-C ends at once without breaking the callback thread).
    """

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        width: int = 30,
        interval: float = 0.1,
    ) -> None:
        self.total: int = total
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.width: int = width
        self.interval: float = interval
        # Imported here: importing this module loads no dispynb module (a node
        # unpickling estimate_pi). Not an Event: the demo's main thread waits on it.
        from dispynb._interruptible import Flag

        self.finished: Flag = Flag()
        self._lock = threading.Lock()
        self._seen: set[Any] = set()
        self._failed: int = 0
        self._cancelled: int = 0
        self._started: float = time.monotonic()
        self._last_draw: float = -math.inf
        self._drawn: int = -1  # jobs shown by the last draw
        self._closed: bool = False
        # Redrawn in place on a terminal only: in a log, each redraw would be text.
        isatty = getattr(self.stream, "isatty", None)
        self._live: bool = bool(isatty and isatty())

    def start(self) -> None:
        """Start the clock used for the rate; call just before submitting."""
        with self._lock:
            self._started = time.monotonic()
            self._draw(time.monotonic())

    def job_status(self, job: Any) -> None:
        """Count ``job`` if its status is final, and redraw; the callback."""
        if job.status not in _FINAL_STATUSES:
            return  # a provisional result
        with self._lock:
            if job.id in self._seen:
                return
            self._seen.add(job.id)
            if job.status == _CANCELLED:  # never ran (Ctrl-C cancels the queue)
                self._cancelled += 1
            elif job.status != _FINISHED:
                self._failed += 1
            now = time.monotonic()
            if len(self._seen) >= self.total:
                self.finished.set()
            if self.finished.is_set() or now - self._last_draw >= self.interval:
                self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line; idempotent."""
        with self._lock:
            if not self._closed:
                if self._drawn != len(self._seen):
                    self._draw(time.monotonic())
                self.stream.write("\n")
                self.stream.flush()
                self._closed = True

    def _draw(self, now: float) -> None:
        if self._closed:
            return
        done = len(self._seen)
        if done < self.total and not self._live:
            return  # a file or a pipe: its one line is the final count (close)
        filled = self.width * done // max(self.total, 1)
        rate = (done - self._cancelled) / max(now - self._started, 1e-9)
        failed = f"  {self._failed} failed" if self._failed else ""
        cancelled = f"  {self._cancelled} cancelled" if self._cancelled else ""
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}]"
            f" {done}/{self.total} jobs  {rate:.1f} jobs/s{failed}{cancelled}"
        )
        self.stream.flush()
        self._last_draw = now
        self._drawn = done


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dispynb`` command."""
    from dispynb._version import __version__

    parser = argparse.ArgumentParser(
        prog="dispynb",
        description="Distributed and parallel computing for Python, dispy-compatible.",
    )
    parser.add_argument("--version", action="version", version=f"dispynb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="estimate pi with Monte Carlo jobs on local nodes",
        description=(
            "Start node servers on 127.0.0.1 (LocalCluster, random secret), run a"
            " Monte Carlo estimate of pi as many jobs, and show the results and the"
            " per-node status."
        ),
    )
    demo.add_argument(
        "--nodes", type=_positive_int, default=2, help="node servers (default: 2)"
    )
    demo.add_argument(
        "--cpus",
        type=_positive_int,
        default=None,
        help="CPUs per node (default: this machine's CPUs divided among the nodes)",
    )
    demo.add_argument(
        "--jobs", type=_positive_int, default=100, help="jobs to run (default: 100)"
    )
    demo.add_argument(
        "--samples",
        type=_positive_int,
        default=400_000,
        help="random points per job (default: 400000, about 0.05 s)",
    )
    demo.add_argument(
        "--seed", type=int, default=1, help="seed of the first job (default: 1)"
    )
    demo.set_defaults(handler=_demo)

    secret = commands.add_parser(
        "secret",
        help="make a new shared secret (256 random bits)",
        description=(
            "Write a new random secret (256 bits, 43 URL-safe characters) to FILE,"
            " created with mode 600 and never overwritten, or print it when no FILE"
            " is given. Give the same file to nodes (dispynb-node --secret-file FILE)"
            " and clients (secret_file=FILE or DISPYNB_SECRET_FILE=FILE)."
        ),
    )
    secret.add_argument("file", nargs="?", default=None, help="file to create")
    secret.set_defaults(handler=_secret)

    from dispynb.runcommand import add_parser as add_run

    add_run(commands)  # dispy's dispy_cmd.py

    version = commands.add_parser("version", help="print the version and exit")
    version.set_defaults(handler=_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dispynb`` command; return the exit code.

    Parameters
    ----------
    argv:
        The arguments after the program name; ``sys.argv[1:]`` by default.
    """
    args = build_parser().parse_args(argv)
    if argv is None and getattr(args, "secret", None):
        from dispynb.secret import hide_secret_argv

        hide_secret_argv(("--secret",))  # out of the process list (dispynb run)
    return int(args.handler(args))


def _version(args: argparse.Namespace) -> int:
    from dispynb._version import __version__

    print(f"dispynb {__version__}")
    return 0


def _secret(args: argparse.Namespace) -> int:
    from dispynb.errors import ConfigurationError
    from dispynb.secret import random_secret, write_new_secret

    if args.file is None:
        print(random_secret())
        return 0
    try:
        write_new_secret(args.file)
    except ConfigurationError as exc:
        print(f"dispynb secret: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a new secret to {args.file} (mode 600)", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Run the pi demo on a LocalCluster; exit status 1 if any job failed."""
    import logging
    import os

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    cpus = args.cpus or max(1, (os.cpu_count() or 1) // args.nodes)
    print(
        f"Starting {args.nodes} local node(s) with {cpus} CPU(s) each;"
        f" {args.jobs} jobs of {args.samples:,} samples."
    )
    return run_command("demo", lambda: _run_demo(args, cpus))


def run_command(name: str, body: Callable[[], int]) -> int:
    """``body()``'s exit status; dispynb's errors and Ctrl-C said in one line on
    stderr (exit status 1 and 130), without a traceback."""
    from dispynb.errors import DispynbError

    try:
        return body()
    except DispynbError as exc:
        print(f"dispynb {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ndispynb {name}: interrupted", file=sys.stderr)
        return 130


def _run_demo(args: argparse.Namespace, cpus: int) -> int:
    from dispynb import JobCluster, LocalCluster

    progress = ProgressLine(args.jobs)
    with (
        LocalCluster(nodes=args.nodes, cpus=cpus) as local,
        JobCluster(estimate_pi, nodes=local, job_status=progress.job_status) as cluster,
    ):
        started = time.monotonic()
        progress.start()
        jobs = [cluster.submit(args.seed + i, args.samples) for i in range(args.jobs)]
        cluster.wait()
        # Callbacks can lag behind wait(); let the line reach its final count.
        progress.finished.wait(timeout=5.0)
        progress.close()
        wall = time.monotonic() - started
        failed = [job for job in jobs if job.status != _FINISHED]
        if not failed:
            _print_results(jobs, args, wall)
        print()
        cluster.print_status()
    if failed:
        _print_failures(failed)
        return 1
    return 0


def _print_results(jobs: Sequence[Any], args: argparse.Namespace, wall: float) -> None:
    """The first jobs as a table, then the combined estimate of pi."""
    header = ("job", "seed", "samples", "hits", "estimate", "node", "seconds")
    rows = [header]
    for index, job in enumerate(jobs[:_TABLE_ROWS]):
        hits, node = job.result
        rows.append(
            (
                str(job.id),
                str(args.seed + index),
                f"{args.samples:,}",
                f"{hits:,}",
                f"{4 * hits / args.samples:.6f}",
                node,
                _seconds(job),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    if len(jobs) > _TABLE_ROWS:
        print(f"... and {len(jobs) - _TABLE_ROWS} more jobs")
    samples = args.samples * len(jobs)
    pi = 4 * sum(job.result[0] for job in jobs) / samples
    print(
        f"\npi ~= {pi:.6f}  (error {abs(pi - math.pi):.2e}; {samples:,} samples"
        f" in {len(jobs)} jobs, {wall:.2f} s, {len(jobs) / wall:.1f} jobs/s)"
    )


def _seconds(job: Any) -> str:
    if job.start_time is None or job.end_time is None:
        return "-"
    return f"{job.end_time - job.start_time:.3f}"


def _print_failures(failed: Sequence[Any]) -> None:
    names = {8: "Cancelled", 9: "Terminated", 10: "Abandoned"}
    print(f"\ndispynb demo: {len(failed)} job(s) failed", file=sys.stderr)
    for job in failed:
        status = names.get(int(job.status), str(job.status))
        print(
            f"\njob {job.id} {status} on {job.ip_addr or 'no node'}:\n"
            f"{job.exception or '(no exception text)'}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
