"""``%dispy`` and ``%%dispy``: choose nodes, and run a cell's function over inputs.

Load with ``%load_ext dispynb``. `DispyMagics` declares both magics' arguments
(parsed with `IPython.core.magic_arguments`, read by `dispynb.jupyter.magicsupport`)
and hands the work over: ``%dispy`` to the shell's `Session` (the nodes,
`dispynb.jupyter.session`), ``%%dispy`` to a `CellRunner` (`dispynb.jupyter.cellrun`).
The only text ever evaluated is the documented ``--over`` expression (and
``--depends``), in the user's namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from dispynb.errors import ConfigurationError
from dispynb.jupyter.cellrun import LAST_RUN, NODES_HINT, CellRunner
from dispynb.jupyter.errors import MagicError, MagicInterrupted
from dispynb.jupyter.magicsupport import (
    adapt_bounds,
    dotted_name,
    malformed_node,
    notebook_function,
    parse_line,
)
from dispynb.jupyter.probing import ProbesInterrupted
from dispynb.jupyter.progress import KINDS
from dispynb.jupyter.session import Session, SessionStatus, launcher_kind
from dispynb.secret import read_secret_file

__all__ = [
    "LAST_RUN",
    "NODES_HINT",
    "DispyMagics",
    "Session",
    "SessionStatus",
    "adapt_bounds",
    "launcher_kind",
]

# ``cell_magic("name")`` returns a decorator, but IPython types it as a union.
_cell_magic_named = cast(
    Callable[[str], Callable[[Callable[..., Any]], Callable[..., Any]]], cell_magic
)


#: What ``%dispy`` does, its first word.
ACTIONS = [
    "local",
    "nodes",
    "ssh",
    "slurm",
    "dask",
    "ray",
    "scheduler",
    "status",
    "panel",
    "close",
]


@contextlib.contextmanager
def _option_words() -> Iterator[None]:
    """A launcher's error names its keyword (``give register_host= ...``): in a
    notebook, say the ``%dispy`` option that does the same."""
    try:
        yield
    except MagicError as exc:
        said = str(exc).replace("register_host=", "--register-host")
        raise MagicError(said) from None


@magics_class
class DispyMagics(Magics):
    """The ``%dispy`` line magic and the ``%%dispy`` cell magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.session = Session()

    @property
    def _ip(self) -> Any:
        """The shell (never None once the magics are registered)."""
        if self.shell is None:
            raise UsageError("the dispynb magics are not attached to a shell")
        return self.shell

    # -- %dispy ----------------------------------------------------------------------

    @magic_arguments()
    @argument(
        "action",
        choices=ACTIONS,
        help=(
            "local: start node servers on this machine (127.0.0.1, random secret); "
            "nodes: use node servers started elsewhere (dispynb-node), given as "
            "HOST or HOST:PORT; ssh: start one node server on each HOST over ssh "
            "(stopped by close, or when the kernel ends); slurm: submit --nodes "
            "node servers as SLURM batch jobs (cancelled by close, or when the "
            "kernel exits); dask: run on an existing Dask cluster, given its "
            "scheduler's ADDRESS; ray: run on an existing Ray cluster, given its "
            "head's ADDRESS (what ray.init takes); scheduler: share the nodes of a "
            "dispynb-scheduler at HOST[:PORT] (--secret-file: your credential); "
            "status: show the nodes "
            "and the runs; panel: show a live table of the nodes; close: cancel "
            "every run and stop local nodes"
        ),
    )
    @argument(
        "hosts",
        nargs="*",
        metavar="HOST[:PORT]",
        help="nodes for 'nodes'; ssh destinations for 'ssh'; the scheduler's "
        "address for 'dask' (tcp://host:8786); the head's address for 'ray' "
        "(host:6379, ray://host:10001)",
    )
    @argument(
        "--nodes",
        dest="count",
        type=int,
        default=1,
        metavar="N",
        help="local: how many node servers to start (default 1); slurm: how many "
        "batch jobs to submit (default 1)",
    )
    @argument(
        "--cpus",
        type=int,
        default=None,
        metavar="N",
        help="local: CPUs per node (default: this machine's CPUs shared by the "
        "nodes); ssh: CPUs per node (default: all of each host's); slurm: CPUs per "
        "job (--cpus-per-task)",
    )
    @argument(
        "--engine",
        choices=["nodes", "dask"],
        default=None,
        help="local: start dispynb's node servers (nodes, the default) or a Dask "
        "LocalCluster used through the Dask engine (dask; --nodes worker processes "
        "of --cpus threads); the default can be set with $DISPYNB_LOCAL_ENGINE",
    )
    @argument(
        "--python",
        default=None,
        metavar="PATH",
        help="ssh: the Python with dispynb installed on the hosts (default python3); "
        "slurm: on the compute nodes (default: this kernel's)",
    )
    @argument("--memory", metavar="SIZE", help="slurm: memory per job (--mem: 4G)")
    @argument(
        "--walltime",
        metavar="TIME",
        help="slurm: time limit per job (--time: minutes, H:MM:SS, D-HH)",
    )
    @argument("--partition", metavar="NAME", help="slurm: the partition")
    @argument("--account", metavar="NAME", help="slurm: the account to charge")
    @argument(
        "--directive",
        action="append",
        default=[],
        metavar="OPTION",
        help="slurm: another #SBATCH option, e.g. --directive=--qos=short (repeatable)",
    )
    @argument(
        "--adapt",
        metavar="MIN:MAX",
        help="ssh, slurm: start nodes as the runs' jobs need them, between MIN and "
        "MAX nodes; nodes idle for --idle-timeout seconds stop (after their jobs)",
    )
    @argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="ssh, slurm with --adapt: how long a node may sit idle (default 60)",
    )
    @argument(
        "--register-host",
        metavar="ADDRESS",
        help="ssh, slurm: this machine's address that the nodes reach to register "
        "(default: the local address that routes to each host, or to slurmctld); "
        "give it when the hosts are reached only through a jump host",
    )
    @argument(
        "--ssh-config",
        metavar="FILE",
        help="ssh: an ssh configuration file to use instead of ~/.ssh/config",
    )
    @argument(
        "--secret-file",
        metavar="FILE",
        help="nodes: file holding the nodes' shared secret (or set DISPYNB_SECRET or "
        "DISPYNB_SECRET_FILE in the environment); scheduler: your credential file",
    )
    @argument(
        "--cafile",
        metavar="FILE",
        help="nodes, scheduler: use TLS, verify the nodes (the scheduler) with it",
    )
    @argument("--certfile", metavar="FILE", help="nodes: TLS client certificate")
    @argument("--keyfile", metavar="FILE", help="nodes: key of --certfile")
    @argument(
        "--pulse",
        type=float,
        metavar="SECONDS",
        help="local, nodes: how often nodes report their load (CPU, memory) and "
        "the node panels show it while runs use them (default: reported every "
        "second, shown every 10 s)",
    )
    @line_magic
    def dispy(self, line: str) -> Any:
        """Choose the nodes ``%%dispy`` runs on, and show or close them.

        Examples::

            %dispy local --cpus 2                    # one local node with 2 CPUs
            %dispy local --nodes 2 --cpus 1          # two local nodes
            %dispy nodes 10.0.0.5 node2:9711 --secret-file ~/.dispynb-secret
            %dispy nodes node1 --cafile ca.pem --secret-file ~/.dispynb-secret
            %dispy ssh node1 node2 --python /opt/venv/bin/python   # over ssh
            %dispy ssh node1 --register-host 10.0.0.2   # behind a jump host
            %dispy slurm --nodes 4 --cpus 8 --memory 16G --walltime 2:00:00
            %dispy dask tcp://scheduler:8786         # an existing Dask cluster
            %dispy scheduler sched1 --secret-file ~/alice.credential  # shared nodes
            %dispy ssh node1 node2 node3 --adapt 0:3 --idle-timeout 120
            %dispy local --nodes 2 --pulse 2         # load reported every 2 s
            %dispy status                            # nodes and runs (returns a repr)
            %dispy panel                             # live table of the nodes
            %dispy close                             # cancel runs, stop local nodes
            %dispy simulate --over "range(100)" --into run   # as %%dispy simulate

        ``%dispy NAME ...`` with a function of the notebook (defined in an earlier
        cell; or a method, ``model.predict``, or a module's function, ``math.sqrt``)
        runs it as a ``%%dispy NAME ...`` cell with nothing else in it would
        (IPython refuses a cell magic with an empty body); see ``%%dispy?``.

        Starting or attaching replaces the current nodes (and cancels their runs),
        once the new ones answer (slurm: before submitting them).
        The panel shows each node's CPUs, busy workers, jobs ended on it (cancelled
        ones too), and its load (CPU used, memory free) as last reported: when a run
        connects, then every ``--pulse`` seconds while runs use it.
        """
        if not line.strip() or line.lstrip().startswith("#"):
            # argparse said "the following arguments are required: action,
            # HOST[:PORT]", though hosts are for some actions only.
            raise UsageError(
                f"%dispy needs what to do: {', '.join(ACTIONS[:-1])} or "
                f"{ACTIONS[-1]} (see %dispy?)"
            )
        first, *rest = line.split(None, 1)
        # A builtin named alone (%dispy help, %dispy list) is a guess at an
        # action, not a run of that builtin over no inputs ("--over is required").
        alone = not rest and first.split(".")[0] not in self._ip.user_ns
        runs = notebook_function(first, self._ip.user_ns) and not alone
        if first not in ACTIONS and runs:
            # %dispy f --over ...: f is a function of an earlier cell (IPython
            # refuses a %%dispy cell with nothing under its line, and says to use
            # %dispy: here it is what that cell would have done), or a method or
            # a module's function (model.predict, math.sqrt).
            return self.cell_dispy(line, "")
        if first not in ACTIONS and dotted_name(first):
            raise UsageError(_not_an_action(first, self._ip.user_ns))
        args = parse_line(self.dispy, line)
        try:
            return self._act(args)
        except KeyboardInterrupt as exc:
            # Stop while nodes start or do not answer: what is in use now, in a line.
            where = self.session.where()
            what = f" ({exc})" if isinstance(exc, ProbesInterrupted) else ""
            raise MagicInterrupted(
                f"Interrupted: %dispy {args.action} did not finish{what}; {where}"
            ) from None

    def _act(self, args: argparse.Namespace) -> Any:
        """Do what the ``%dispy`` line ``args`` asks."""
        session = self.session
        if (
            args.action not in ("nodes", "ssh", "dask", "ray", "scheduler")
            and args.hosts
        ):
            raise UsageError(f"%dispy {args.action} takes no hosts: {args.hosts}")
        if args.engine is not None and args.action != "local":
            raise UsageError("--engine is for %dispy local")
        if args.pulse is not None and args.action not in (
            "local",
            "nodes",
            "ssh",
            "slurm",
        ):
            raise UsageError("--pulse is for %dispy local, nodes, ssh and slurm")
        pulse = {} if args.pulse is None else {"pulse_interval": args.pulse}
        if args.adapt is not None and args.action not in ("ssh", "slurm"):
            raise UsageError("--adapt is for %dispy ssh and slurm")
        adapt = None if args.adapt is None else adapt_bounds(args.adapt, args)
        if args.register_host is not None and args.action not in ("ssh", "slurm"):
            raise UsageError(
                "--register-host is for %dispy ssh and slurm: this machine's "
                "address that the nodes reach (e.g. --register-host 10.0.0.2)"
            )
        if args.action == "local":
            if args.count < 1 or (args.cpus is not None and args.cpus < 1):
                raise UsageError("--nodes and --cpus must be at least 1")
            session.start_local(args.count, args.cpus, pulse, args.engine)
            print(f"dispynb: {session.where()}")
            return None
        if args.action == "ssh":
            if not args.hosts:
                raise UsageError("%dispy ssh needs at least one HOST")
            if args.cpus is not None and args.cpus < 1:
                raise UsageError("--cpus must be at least 1")
            node_args = [] if args.cpus is None else ["--cpus", str(args.cpus)]
            ssh_options = (
                ["-F", os.path.expanduser(args.ssh_config)] if args.ssh_config else []
            )
            with _option_words():
                session.start_ssh(
                    list(args.hosts),
                    node_args,
                    args.python or "python3",
                    ssh_options,
                    pulse,
                    adapt,
                    register_host=args.register_host,
                )
            print(f"dispynb: {session.where()}")
            return None
        if args.action == "slurm":
            if args.count < 1 or (args.cpus is not None and args.cpus < 1):
                raise UsageError("--nodes and --cpus must be at least 1")
            launcher = {
                "cpus": args.cpus,
                "memory": args.memory,
                "walltime": args.walltime,
                "partition": args.partition,
                "account": args.account,
                "directives": args.directive,
                "register_host": args.register_host,
            }
            if args.python:
                launcher["python"] = args.python
            with _option_words():
                session.start_slurm(args.count, pulse, adapt, **launcher)
            print(f"dispynb: {session.where()}")
            return None
        if args.action == "dask":
            if len(args.hosts) != 1:
                raise UsageError("%dispy dask needs the scheduler's ADDRESS only")
            session.use_dask(args.hosts[0])
            print(f"dispynb: {session.where()}")
            return None
        if args.action == "scheduler":
            if len(args.hosts) != 1:
                raise UsageError("%dispy scheduler needs the scheduler's HOST[:PORT]")
            credential = args.secret_file and os.path.expanduser(args.secret_file)
            cafile = args.cafile and os.path.expanduser(args.cafile)
            session.use_scheduler(args.hosts[0], credential, cafile)
            print(f"dispynb: {session.where()}")
            return None
        if args.action == "ray":
            if len(args.hosts) != 1:
                raise UsageError("%dispy ray needs the Ray cluster's ADDRESS only")
            session.use_ray(args.hosts[0])
            print(f"dispynb: {session.where()}")
            return None
        if args.action == "nodes":
            if not args.hosts:
                raise UsageError("%dispy nodes needs at least one HOST[:PORT]")
            for host in args.hosts:  # before the nodes in use are replaced
                problem = malformed_node(host)
                if problem:
                    raise UsageError(f"%dispy nodes {host}: {problem}")
            options = {
                key: os.path.expanduser(value)
                for key, value in (
                    ("secret_file", args.secret_file),
                    ("cafile", args.cafile),
                    ("certfile", args.certfile),
                    ("keyfile", args.keyfile),
                )
                if value
            }
            if "secret_file" in options:  # the notebook's mistake, not the nodes'
                try:
                    read_secret_file(options["secret_file"])
                except ConfigurationError as exc:
                    raise UsageError(f"--secret-file: {exc}") from None
            session.attach(list(args.hosts), {**options, **pulse})
            print(f"dispynb: {session.where()}")
            return None
        if args.action == "status":
            return session.status()
        if args.action == "panel":
            display(session.panel)
            return None
        started = session.local
        used = session.where() if session.attached else ""
        session.close(ended=True)  # says first which runs it stopped, if any
        if started is not None:
            print(f"dispynb: {launcher_kind(started)} nodes stopped")
        elif used:  # nodes, an engine or a scheduler of others: they go on
            print(f"dispynb: no longer using {used}; they keep running")
        else:
            print("dispynb: no nodes were in use")
        return None

    # -- %%dispy ---------------------------------------------------------------------

    @magic_arguments(name="%dispy")  # the usage line then reads %%dispy
    @argument(
        "function",
        nargs="?",
        help="name of the function to run (default: the last function the cell "
        "defines with def)",
    )
    @argument(
        "--over",
        required=True,
        metavar="EXPR",
        help="Python expression giving the inputs, evaluated in the notebook's "
        'namespace: one job per item, e.g. --over "range(100)" or --over xs',
    )
    @argument(
        "--into",
        metavar="NAME",
        help="variable to store the run in (a dispynb.jupyter.Run: .results, .df, "
        ".jobs, .failures, .wait(), .cancel()); the last run is also in _dispy. "
        "Not a name Python or IPython gives (print, len, Out...): that is refused",
    )
    @argument(
        "--nowait",
        action="store_true",
        help="return at once; progress and output update live in the cell (its "
        "widgets, or HTML redrawn in place with --progress html)",
    )
    @argument(
        "--unpack",
        action="store_true",
        help="items are argument tuples, f(*item), or keyword dicts, f(**item)",
    )
    @argument(
        "--setup",
        metavar="NAME",
        help="name of a setup function run once on each node before the jobs "
        "(as JobCluster(setup=...)): load data into globals there",
    )
    @argument(
        "--depends",
        metavar="EXPR",
        help="Python expression giving a list of dependencies sent once to each "
        "node before the jobs, as JobCluster(depends=...): data files (placed in "
        "the jobs' working directory, and kept by the node so that the same file "
        "is not sent again), modules, functions, classes; or one file's path as "
        "it is (--depends data.csv)",
    )
    @argument(
        "--on",
        action="append",
        metavar="NODE",
        help="run only on this node (HOST:PORT, host or name, as %%dispy status "
        "lists them); repeat for several nodes; default: every node in use",
    )
    @argument(
        "--progress",
        choices=KINDS,
        default="auto",
        help="progress display: widget in a kernel, text in a terminal (auto), or "
        "html (static, for front ends without widgets), or none",
    )
    @argument(
        "--quiet",
        action="store_true",
        help="do not print remote stdout, stderr and tracebacks (still in .df)",
    )
    @argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="wait at most this long, then cancel the unfinished jobs (the cell "
        "fails if none finished)",
    )
    @argument(
        "--reentrant",
        action="store_true",
        help="a job whose node is lost (killed, cut off, stopped) runs again on "
        "another node, as JobCluster(reentrant=True); without it such a job ends "
        "Abandoned. For functions that may safely run twice",
    )
    @_cell_magic_named("dispy")
    def cell_dispy(self, line: str, cell: str) -> None:
        """Run a function defined in this cell once per input, on the nodes.

        The cell is executed in the notebook's namespace first (so its functions,
        classes and imports are defined there too); then the function named on the
        magic line, or the last one the cell defines, runs once per item of
        ``--over``. Functions, closures, helpers and classes defined in cells travel
        by value.

        By default the cell blocks, showing live progress, and prints each job's
        remote stdout and stderr as the job ends (the first and last lines of a
        long output: ``.jobs[i].stdout`` and ``.df`` keep all of it), and the
        remote traceback of the first failure of each exception type. A cell whose
        jobs all failed fails too (Run All stops there); with some failures it
        succeeds, and ``run.failures`` lists them. Interrupting the cell (Stop
        button, Ctrl-C) cancels the run's queued and running jobs on the nodes.

        Without ``%dispy local`` or ``%dispy nodes`` first, one local node using
        every CPU is started.

        A function that captures a large object (over 1 MB pickled: a closure
        variable, a global, a default argument) gets a warning naming it: that
        object is sent to every node with the function on every run. Send it once
        with ``--depends`` (as a file) and ``--setup`` instead.

        Jobs that call ``dispy_provisional_result(value)`` show the count and the
        latest value in the progress; ``run.provisional`` and the ``provisional``
        column of ``run.df`` hold each job's latest one. Files a job sends back
        with ``dispy_send_file(path)`` are saved under the notebook's directory.

        A job running on a node that is lost (killed, cut off, stopped) ends
        ``Abandoned``; with ``--reentrant`` it runs again on another node instead
        (the function must be safe to run twice).

        Remote tracebacks point at the cell lines the failing code came from when
        that is unambiguous (``Cell In[3], line 4, in f`` and the line itself).

        A function defined in an earlier cell runs from a line of its own, with the
        same options: ``%dispy simulate --over "range(100)" --into run`` (IPython
        refuses a ``%%dispy`` cell with nothing under its line).

        Examples::

            %%dispy --over "range(100)" --into run
            def square(x):
                return x * x

            %%dispy simulate --over "[(s, 0.1) for s in seeds]" --unpack --nowait
            def simulate(seed, noise): ...

            %%dispy --over "words" --depends "['table.csv']" --setup load --on local-1
            def lookup(word): ...

        Then ``run.results``, ``run.df`` (one row per job), ``run.failures``.
        """
        __tracebackhide__ = True  # an error in the cell shows the cell's lines
        args = parse_line(self.cell_dispy, line)
        CellRunner(self._ip, self.session).run(args, cell)


def _not_an_action(word: str, namespace: dict[str, Any]) -> str:
    """What to say of ``%dispy WORD`` when WORD is neither an action nor a function
    of the notebook: a misspelt action, or a function not defined yet."""
    import difflib

    functions = [
        name
        for name, value in namespace.items()
        if callable(value) and not name.startswith("_")
    ]
    if "." in word:  # model.predict: its object is there, or not yet
        return (
            f"%dispy {word}: {word!r} is not a function of the notebook (run the "
            "cell that defines it first, and check its spelling) (see %dispy?)"
        )
    close = difflib.get_close_matches(word, [*ACTIONS, *functions], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return (
        f"%dispy {word}: {word!r} is neither one of {', '.join(ACTIONS)} nor a "
        f"function of the notebook (run the cell that defines it first){hint} "
        "(see %dispy?)"
    )
