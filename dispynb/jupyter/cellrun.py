"""The ``%%dispy`` cell runner: run a cell's body, then its function over inputs.

`CellRunner` gets the parsed magic line (`dispynb.jupyter.magics.DispyMagics`
parses it) and the cell: it executes the body in the notebook's namespace, finds the
function, starts a `Run` on the `Session`'s nodes, keeps it in the notebook's
variables and waits for it (or lets it go live with ``--nowait``). The only text it
evaluates is the documented ``--over`` and ``--depends`` expressions, in the user's
namespace.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import linecache
import os
import re
import reprlib
import sys
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from IPython.core.error import UsageError
from IPython.display import display

from dispynb.depends import check as check_depends
from dispynb.errors import ConfigurationError
from dispynb.job import JobStatus
from dispynb.jupyter import shipping
from dispynb.jupyter.errors import MagicError, RunInterrupted
from dispynb.jupyter.magicsupport import (
    callers_of,
    cell_origin,
    dotted_name,
    friendly_errors,
    last_function,
    notebook_function,
    unquote,
)
from dispynb.jupyter.progress import (
    HTMLOutput,
    HTMLProgressBar,
    WidgetOutput,
    WidgetProgressBar,
    make_progress,
    resolve_kind,
)
from dispynb.jupyter.run import LAST_RUN, Run
from dispynb.jupyter.runoutput import _print_writer, exception_kind
from dispynb.jupyter.session import Session
from dispynb.jupyter.startnotice import StartNotice
from dispynb.jupyter.tracebacks import SourceMap
from dispynb.jupyter.widgets import NodePanel

__all__ = ["LAST_RUN", "NODES_HINT", "CellRunner"]

#: What to do when no node can be used, the end of every such error.
NODES_HINT = (
    "start nodes on this machine with %dispy local, or use running ones with "
    "%dispy nodes HOST[:PORT] ... (see %dispy?)"
)


#: How a job the run cancelled ends: before it ran, or stopped while running.
_CANCELLED = frozenset({JobStatus.Cancelled, JobStatus.Terminated})


class CellRunner:
    """Runs one ``%%dispy`` cell in ``shell`` on ``session``'s nodes."""

    def __init__(self, shell: Any, session: Session) -> None:
        self.shell = shell
        self.session = session
        self._begun = False  # the cell's run is starting: its Stop is handled

    def run(self, args: Any, cell: str) -> None:
        """Run ``cell`` as the magic line's ``args`` (parsed) say."""
        __tracebackhide__ = True
        self._begun = False
        try:
            self._run(args, cell)
        except KeyboardInterrupt as exc:
            if isinstance(exc, RunInterrupted) or self._begun:
                raise
            # Stop as the cell's code ran or --over was read: one line too, and
            # the cell's names do not keep an earlier cell's run.
            message = (
                "Interrupted: %%dispy stopped before its run began; no job was sent"
            )
            self._keep(Run.failed(args.into or "run", message), args.into)
            raise RunInterrupted(message) from None

    def _run(self, args: Any, cell: str) -> None:
        # IPython hides the frames that say so: an error in the person's code (the
        # cell, --over and what it iterates) shows their lines, not dispynb's.
        __tracebackhide__ = True
        if args.into is not None:
            problem = _into_problem(args.into, self.shell)
            if problem is not None:  # before the cell's code runs: nothing is done
                raise UsageError(problem)
        if args.function is not None and not dotted_name(args.function):
            raise UsageError(
                f"the function must be a name (simulate, model.predict), not "
                f"{args.function!r}"
            )
        if args.timeout is not None and not args.timeout > 0:
            # It ran the cell, sent every job and cancelled them all at once.
            raise UsageError(
                f"--timeout takes the seconds to wait, above 0, not {args.timeout:g}"
                " (--nowait returns at once)"
            )
        try:
            resolve_kind(args.progress)  # $DISPYNB_PROGRESS misspelt: said first
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        ran = self._run_body(cell)
        if not ran.success:  # IPython showed the error; the cell must fail too
            error = ran.error_before_exec or ran.error_in_exec
            what = type(error).__name__ if error is not None else "an error"
            message = f"the cell's code raised {what}"
            self._keep(Run.failed(args.into or "run", message), args.into)
            # An error reply: Run All stops here, as after any cell that raised.
            raise MagicError(f"no jobs were submitted: {message} (above)")
        source = self.shell.transform_cell(cell)
        name = args.function or last_function(source)
        if name is None:
            raise UsageError(
                "this cell defines no function: define one with def, or name one "
                "on the magic line (%%dispy NAME --over ...)"
            )
        func = self._lookup(name, "function")
        callers = [] if args.function else callers_of(source, name)
        if callers:  # likely a helper written below the function meant to run
            print(
                f"dispynb: running {name}, the cell's last function, which "
                f"{' and '.join(callers)} call{'s' * (len(callers) == 1)}; to run "
                f"{callers[0]}: %%dispy {callers[0]} --over ...",
                file=sys.stderr,
            )
        setup = self._lookup(args.setup, "--setup") if args.setup else None
        inputs = _Inputs(self._evaluate("--over", args.over))
        problem = (
            shipping.return_problem(func)
            or _frame_problem(inputs.items, unquote(args.over))
            or _number_problem(inputs.items, unquote(args.over))
            or _call_problem(func, inputs.items, args.unpack)
        )
        if problem is not None:  # every job would fail alike: say so, send none
            self._keep(Run.failed(args.into or name, problem), args.into)
            raise UsageError(problem)
        depends = None
        if args.depends is not None:
            depends = self._evaluate_depends(args.depends)
            if not isinstance(depends, list | tuple):
                depends = [depends]  # one file, module or function
            try:  # before the nodes: the mistake is the cell's, not theirs
                check_depends(depends, "--depends")
            except ConfigurationError as exc:
                problem = str(exc)
                if " is not a file" in problem:
                    problem += f" (a relative path starts in {os.getcwd()})"
                self._keep(Run.failed(args.into or name, problem), args.into)
                raise UsageError(problem) from None
        session = self.session
        label = args.into or name
        runs: list[Run] = []  # the run, once its cluster is up (for the panel)
        # A cell run again: its earlier run would keep the CPUs and lose its name.
        session.stop_runs(label)
        self._begun = True  # from here a Stop says what it stopped (below)
        try:
            if session.ensure_nodes():
                print(f"dispynb: started {session.where()}", file=sys.stderr)
            nodes = session.nodes
            options = dict(session.options)
            if args.on:
                nodes, options = session.select_nodes(args.on)
            if setup is not None:
                options["setup"] = setup
            if depends is not None:
                options["depends"] = list(depends)
            if args.reentrant:
                options["reentrant"] = True
            # Said if the setup takes a while (a model loading): no bar shows yet.
            notice = StartNotice(label, setup) if setup is not None else None

            def started(run: Run) -> None:
                if notice is not None:
                    notice.done()
                runs.append(run)

            try:
                with friendly_errors(
                    f"%%dispy could not start run {label!r}",
                    hint=NODES_HINT,
                    sources=SourceMap.of(setup),
                ):
                    run = Run.map(
                        func,
                        inputs,
                        nodes=nodes,
                        engine=session.engine,
                        cluster_factory=session.cluster_factory,
                        unpack=args.unpack,
                        wait=False,
                        progress="none" if args.nowait else args.progress,
                        name=label,
                        listeners=[_PanelListener(session.panel, runs)],
                        started=started,
                        **options,
                    )
            finally:
                if notice is not None:
                    notice.done()
            run.ref = args.into or LAST_RUN
            if not run.jobs:  # else 'f: 0/0 done' reads like a run that worked
                used = iter(inputs.items) is inputs.items  # (an iterator: no error)
                print(
                    f"dispynb: --over {unquote(args.over)!r} gave no inputs: no job "
                    "was sent"
                    + (
                        " (an iterator, used up by an earlier run? make it again, "
                        "or give a list)"
                        if used
                        else ""
                    ),
                    file=sys.stderr,
                )
        except MagicError as exc:
            # Nodes that died as the run started: that is the news, not the refusal.
            exited = session.exited_error()
            if exited is None or str(exited) == str(exc):
                exited = None
            # The names still say what happened: no stale run from an earlier cell.
            self._keep_unfinished(runs, label, str(exited or exc), args.into)
            if exited is None:
                raise
            raise exited from None
        except _InputFailed as failed:
            # --over's iterator raised: Run.map cancelled what it sent.
            error = failed.error
            message = f"--over raised {type(error).__name__}: {error}"
            self._keep_unfinished(runs, label, message, args.into)
            frames = _own_frames(error.__traceback__)
            if frames is None:  # not iterable: no line of the person's to show
                raise UsageError(
                    f"--over {unquote(args.over)!r} raised {type(error).__name__}: "
                    f"{error}"
                ) from None
            raise error.with_traceback(frames) from None
        except KeyboardInterrupt as exc:
            # Stop while connecting or submitting: Run.map cancelled what it sent
            # (and says so), or the nodes were still starting; or just after it
            # returned: its jobs are stopped here.
            if isinstance(exc, RunInterrupted):
                message = str(exc)
            elif runs and runs[0].jobs:
                message = runs[0].stop("Interrupted", quiet=True)
            else:
                message = f"Interrupted: run {label!r} stopped before it started"
            self._keep_unfinished(runs, label, message, args.into, "Interrupted")
            raise RunInterrupted(message) from None
        try:
            session.add_run(run)
            self._keep(run, args.into)
            if args.nowait:
                self._go_live(run, args.progress)
                return None
            finished = run.wait(timeout=args.timeout, echo=not args.quiet)
        except RunInterrupted:
            raise
        except KeyboardInterrupt:
            # Stop before the wait began (as the run was kept, or shown live): the
            # run is stopped all the same, not left running with nobody waiting.
            raise RunInterrupted(run.stop("Interrupted", quiet=True)) from None
        if not finished:
            summary = run.stop(f"Timed out after {args.timeout} s", quiet=True)
            if any(job.status is JobStatus.Finished for job in run.jobs):
                run.bar.before_output()
                _print_writer("stderr", summary + "\n")
            else:
                # Nothing to go on with, as when every job failed (below).
                cancelled = sum(job.status in _CANCELLED for job in run.jobs)
                raise MagicError(
                    f"no job of run {label!r} finished within --timeout "
                    f"{args.timeout:g} s ({cancelled} cancelled): give it more "
                    f"seconds; {run.ref}.df has the jobs"
                )
            return None
        failures = run.failures
        if failures and len(failures) == len(run.jobs):
            # Nothing to go on with: the cell fails, so Run All (and a notebook
            # executed in CI) stops here instead of running on without results.
            kinds = ", ".join(sorted({exception_kind(j.exception) for j in failures}))
            which = f"all {len(failures)} jobs" if len(failures) > 1 else "the job"
            # The first failure of each kind is shown above: with a traceback, or
            # only its reason (a worker that died, a result that could not be sent).
            traced = any("Traceback" in str(job.exception) for job in failures)
            what = "traceback" if traced else "reason"
            shown = "" if args.quiet else f"the {what} is above; "
            raise MagicError(
                f"{which} of run {label!r} failed ({kinds}): {shown}"
                f"{run.ref}.failures has {'them' if len(failures) > 1 else 'it'}"
            )
        return None

    def _keep(self, run: Run, into: str | None) -> None:
        self.shell.user_ns[LAST_RUN] = run
        if into:
            self.shell.user_ns[into] = run

    def _keep_unfinished(
        self, runs: list[Run], label: str, why: str, into: str | None, cut: str = ""
    ) -> None:
        """Keep what `_unfinished` says of a run that did not start or was cut
        short; one that sent jobs is listed by ``%dispy status`` too, as a run
        stopped while waiting is."""
        run = _unfinished(runs, label, why, cut)
        if run.jobs:
            self.session.add_run(run)
        self._keep(run, into)

    def _run_body(self, cell: str) -> Any:
        """Execute the cell's body in the notebook's namespace, compiled as the
        lines the person sees: tracebacks (local, and remote ones rewritten by
        `dispynb.jupyter.tracebacks`) name this cell's prompt number and its
        editor lines, counting the ``%%dispy`` line."""
        shell = self.shell
        number, header = cell_origin(shell, cell)
        if number is None:
            return shell.run_cell(cell, store_history=False)
        # Comments keep the lines in place (IPython drops leading blank lines).
        source = "".join(f"#{line}\n" for line in header) + cell
        saved = shell.execution_count
        shell.execution_count = number  # the compiled code is named after it
        try:
            return shell.run_cell(source, store_history=False)
        finally:
            shell.execution_count = saved

    def _evaluate(self, option: str, text: str) -> Any:
        """``option``'s expression evaluated in the notebook's namespace; an error
        shows its text (as ``<--over>``, line 1), not an anonymous string, and a
        name the notebook lacks is a one-line `UsageError`."""
        __tracebackhide__ = True
        source = unquote(text)
        filename = f"<{option}>"
        linecache.cache[filename] = (len(source) + 1, None, [source + "\n"], filename)
        try:
            code = compile(source, filename, "eval")
        except SyntaxError as exc:  # IPython would show every frame for it
            raise UsageError(f"{option} {source!r}: {exc.msg}") from None
        try:
            return eval(code, self.shell.user_global_ns, self.shell.user_ns)
        except NameError as exc:
            if not _raised_in(exc, filename):
                raise  # raised in a function it calls: its traceback says where
            # A name the notebook lacks (a typo, a cell not run yet): one line,
            # not the magic's call and hidden frames around <--over>.
            raise UsageError(
                f"{option} {source!r}: {exc} in the notebook: run the cell that "
                "defines it first, or fix the name"
            ) from None

    def _evaluate_depends(self, text: str) -> Any:
        """``--depends``'s expression; or, when it is no expression of the notebook
        but a path here, that file: ``--depends data.csv`` was read as the attribute
        ``csv`` of a variable ``data`` ("name 'data' is not defined")."""
        __tracebackhide__ = True
        path = unquote(text)
        try:
            return self._evaluate("--depends", text)
        except (UsageError, AttributeError) as exc:
            if os.path.exists(path):
                return [path]
            if not re.search(r"[./]", path) or not (
                isinstance(exc, UsageError) or _raised_in(exc, "<--depends>")
            ):
                raise
            # (data.csv with a DataFrame named data: "'DataFrame' object has no
            # attribute 'csv'" alone hid that the file is missing)
            said = exc if isinstance(exc, UsageError) else f"--depends {path!r}: {exc}"
            raise UsageError(
                f"{said}; nor is there a file {path!r} in {os.getcwd()} (where a "
                "relative path starts)"
            ) from None

    def _lookup(self, name: str, what: str) -> Any:
        value = notebook_function(name, self.shell.user_ns)
        if value is None:
            called = name.partition("(")[0]
            if called != name and notebook_function(called, self.shell.user_ns):
                # --setup load(): the nodes call it; the magic takes its name.
                raise UsageError(
                    f"{what} {name}: name the function, without calling it: "
                    f"{what} {called}"
                )
            raise UsageError(f"{what}: {name!r} is not a function in the notebook")
        return value

    def _go_live(self, run: Run, kind: str) -> None:
        kind = resolve_kind(kind)
        if kind == "widget":
            bar = WidgetProgressBar(run.name)
            out = WidgetOutput()  # made static with the bar when the run ends
            bar.outputs.append(out)
            bar.show()
            out.show()
            run.live(bar, out.write)
        elif kind == "html":  # no widgets: displays of this cell redrawn in place
            html_bar = HTMLProgressBar(run.name)
            html_out = HTMLOutput()
            html_bar.outputs.append(html_out)
            html_bar.show()
            html_out.show()
            run.live(html_bar, html_out.write)
        else:  # a terminal: nothing written under the prompt later
            display(run)
            run.live(make_progress("none", title=run.name))


def _into_problem(name: str, shell: Any) -> str | None:
    """Why ``--into NAME`` cannot name the run (not a name, or one Python or
    IPython gives a meaning the notebook relies on); None if it can."""
    if not name.isidentifier() or keyword.iskeyword(name):
        return f"--into needs a variable name, not {name!r}"
    if hasattr(builtins, name):
        what = "built-in function" if callable(getattr(builtins, name)) else "name"
        return (
            f"--into {name} would hide Python's {what} {name} in this notebook: "
            "choose another name for the run"
        )
    if name in getattr(shell, "user_ns_hidden", {}):
        return (
            f"--into {name} would replace IPython's {name} in this notebook: "
            "choose another name for the run"
        )
    return None


def _unfinished(runs: list[Run], label: str, why: str, cut: str = "") -> Run:
    """What the cell's names keep when its run did not start (``why``), or
    stopped while submitting (``cut``, default ``why``): that run, with the jobs
    it did submit (cancelled), or a run that says it could not start."""
    if runs and runs[0].jobs:
        run = runs[0]
        run.cut_short = cut or why
        return run
    return Run.failed(label, why)


class _PanelListener:
    """Feeds a panel a run's events, telling a node that left while the run's
    cluster was open (it died or shut down) from one released at its close."""

    #: The panel follows nodes, not jobs: a run's `Run.forwards_events` need not
    #: copy jobs for it (nor tell it of ``Created``, which names no node).
    reads_jobs = False

    def __init__(self, panel: NodePanel, runs: list[Run]) -> None:
        self._panel = panel
        self._runs = runs

    def __call__(self, status: int, node: Any, job: Any) -> None:
        from dispynb.node import NodeStatus

        runs = self._runs
        cluster = runs[0].cluster if runs else None
        lost = (
            status == NodeStatus.Closed
            and cluster is not None
            and not getattr(cluster, "_closed", True)
        )
        self._panel.cluster_status(status, node, job, lost=lost)


class _InputFailed(Exception):
    """Carries an error of --over's iterator past `Run.map` (and past
    `friendly_errors`, which would read an `OSError` as the nodes' fault)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Inputs:
    """``--over``'s items; an error while producing one becomes `_InputFailed`."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __length_hint__(self) -> Any:
        """How many items there are, if ``--over`` says (``len``)."""
        try:
            return len(self.items)
        except Exception:  # no len(), or one that raises: unknown
            return NotImplemented

    def __iter__(self) -> Iterator[Any]:
        try:
            iterator = iter(self.items)
        except TypeError as exc:  # --over 5
            raise _InputFailed(exc) from None
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                raise _InputFailed(exc) from None
            yield item


def _number_problem(items: Any, text: str) -> str | None:
    """What to write instead when ``--over`` (``text``) is a whole number, the
    count of jobs wanted (it said "raised TypeError: 'int' object is not
    iterable"); None for anything else."""
    if not isinstance(items, int) or isinstance(items, bool):
        return None
    return (
        f'--over {text} is one number, not the inputs: --over "range({text})" '
        f'runs {items} jobs, with inputs 0 to {items - 1}; --over "[{text}]" runs '
        f"one, with input {items} (no job was sent)"
    )


def _frame_problem(items: Any, text: str) -> str | None:
    """What to write instead when ``--over`` (``text``) is a pandas DataFrame: going
    over one gives its column names, never its rows; None for anything else."""
    pandas = sys.modules.get("pandas")  # not loaded: it cannot be a DataFrame
    if pandas is None or not isinstance(items, pandas.DataFrame):
        return None
    names = reprlib.repr(tuple(items.columns))
    return (
        f"--over {text} is a DataFrame: going over it gives its column names "
        f"{names}, one job each; for one job per row, use --over "
        f"\"{text}.to_dict('records')\" --unpack (a row's columns as keyword "
        f'arguments) or --over "{text}.itertuples()" (no job was sent)'
    )


def _call_problem(func: Callable[..., Any], items: Any, unpack: bool) -> str | None:
    """Why ``func`` cannot take the first of ``items`` (a list, tuple or range) as
    its arguments, as `Run.submit_all` passes them, with the fix; None if it can
    (or that cannot be told before it runs: an iterator, no signature)."""
    if not isinstance(items, list | tuple | range) or not items:
        return None
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    first = items[0]

    def binds(spread: bool) -> str | None:
        try:
            if spread and isinstance(first, dict):
                signature.bind(**first)
            elif spread and isinstance(first, tuple | list):
                signature.bind(*first)
            else:
                signature.bind(first)
        except TypeError as exc:
            return str(exc)
        return None

    error = binds(unpack)
    if error is None:
        return None
    name = getattr(func, "__name__", "the function")
    problem = (
        f"{name}{signature} cannot take --over's first input, "
        f"{reprlib.repr(first)}{', unpacked' if unpack else ''}: {error}"
    )
    if not unpack and isinstance(first, tuple | list | dict) and binds(True) is None:
        kind = "keys and values" if isinstance(first, dict) else "items"
        problem += f"; add --unpack to pass its {kind} as the arguments"
    elif unpack and binds(False) is None:
        problem += "; without --unpack each input is the one argument"
    return problem + " (no job was sent)"


def _raised_in(exc: BaseException, filename: str) -> bool:
    """``exc`` was raised by the code of ``filename`` itself (an option's
    expression, ``<--over>``), not in a function it calls."""
    last = exc.__traceback__
    while last is not None and last.tb_next is not None:
        last = last.tb_next
    return last is not None and last.tb_frame.f_code.co_filename == filename


def _own_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` from the first frame that is not dispynb's (the person's code)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(here):
        tb = tb.tb_next
    return tb
