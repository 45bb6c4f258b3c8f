"""A `Run`'s output: the progress bar and each ended job's remote stdout, stderr
and first traceback of each kind, written by whoever draws (the waiting thread, or
the callback thread in live mode).

Job output is cut short where it is shown (the run keeps all of it): the Jupyter
server stops forwarding a kernel's output above 1 MB/s over 3 s ("IOPub data rate
exceeded", ``iopub_data_rate_limit``), and drops the progress and tracebacks with
it; a browser slows to a crawl on megabytes of text in a cell anyway.
"""

from __future__ import annotations

import os
import re
import reprlib
import sys

from dispynb._interruptible import HeldInterrupts
from dispynb.job import DispyJob, JobStatus
from dispynb.jupyter.ownmodules import own_module_hint, without_client_advice
from dispynb.jupyter.runstate import _FAILED, Writer, _RunState
from dispynb.tracebacks import cell_name
from dispynb.transport.addressing import format_address

#: Characters of one job's stdout (or stderr) shown: its first lines and its last.
JOB_SHOWN = 10_000
#: Lines of one job's stdout (or stderr) shown.
JOB_LINES = 200
#: Of which its last lines (a log's end: the final loss, the error it printed).
JOB_TAIL = 2_500
#: Characters of job output one run shows in all (a third of the server's window).
RUN_SHOWN = 1_000_000


class _RunOutput(_RunState):
    """Drawing the bar and writing the output of the jobs that ended."""

    def _pump(self, writer: Writer | None) -> None:
        """Draw the bar and write the output of jobs that ended since the last call."""
        self.bar.update(self.counts())
        while True:
            # A job taken off the queue is written whole even if Stop comes
            # meanwhile (its output and traceback would be lost, never shown).
            with HeldInterrupts():
                try:
                    job = self._outputs.popleft()
                except IndexError:
                    break
                if writer is not None:
                    self.bar.before_output()
                    self._write_job(job, writer)

    def _write_job(self, job: DispyJob, writer: Writer) -> None:
        index = self._index.get(job.id)
        # Labelled by the input's index, the row of `df` and `jobs`: job ids run
        # on over the kernel's runs (and start at 1), naming no row of this run.
        label = f"[job {job.id}] " if index is None else f"[input {index}] "
        for stream in ("stdout", "stderr"):
            text = getattr(job, stream)
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            if not text:
                continue
            if self._shown >= RUN_SHOWN:
                if not self._muted:
                    self._muted = True
                    writer(
                        stream,
                        f"[dispynb] the output of further jobs is not shown here "
                        f"({self._shown:,} characters shown); "
                        f"{self._reach('df.stdout')} and .stderr have all of it\n",
                    )
                continue
            where = self._reach(f"jobs[{index}].{stream}")
            shown = _clip(
                _cells_named(text) if stream == "stderr" else text, label, where
            )
            self._shown += len(shown)
            writer(stream, shown)
        if job.status in _FAILED and job.id not in self._cancelled:
            kind = exception_kind(job.exception)
            seen = self._failure_kinds.setdefault(kind, [])
            seen.append(job)
            if len(seen) == 1:
                where = self._where_failed(job)
                index = self._index.get(job.id)
                shown = self.traceback(job).rstrip()
                own = own_module_hint(job.exception or "")
                if own:  # in %%dispy's words, not JobCluster's
                    shown = without_client_advice(shown)
                writer(
                    "stderr",
                    f"input {index}: {self._call_of(job)}{where} failed "
                    f"(job {job.id}):\n"
                    f"{shown}\n{_missing_file_hint(job)}{_missing_name_hint(job)}{own}"
                    f"{self._reentrant_hint(job)}",
                )

    def _call_of(self, job: DispyJob) -> str:
        """``fragile(0)``: the call a job made, its arguments cut short as `reprlib`
        does. 'job 14 (input 1) failed' alone read as the input 1 to a newcomer,
        whose failing input was 0, the second one."""
        computation = getattr(
            getattr(self.cluster, "_options", None), "computation", None
        )
        if isinstance(computation, str):  # a program
            name = os.path.basename(computation)
        else:
            name = getattr(computation, "__name__", None) or self.name
        shown = reprlib.Repr()  # no keywords before Python 3.12
        shown.maxlevel, shown.maxstring, shown.maxother = 2, 40, 40
        given = [shown.repr(arg) for arg in job._args]
        given += [f"{key}={shown.repr(value)}" for key, value in job._kwargs.items()]
        return f"{name}({', '.join(given)})"

    def _reach(self, path: str) -> str:
        """How the person reaches ``path`` of this run: ``r.failures``, or ``the
        run's .failures`` when no variable of theirs is known to hold it (before,
        ``run.failures``, which in a notebook could be another run)."""
        return f"{self.ref}.{path}" if self.ref else f"the run's .{path}"

    def _reentrant_hint(self, job: DispyJob) -> str:
        """Once a run: a line saying that jobs lost with their node could run
        again elsewhere, if ``job`` is one and the run's cluster is not reentrant;
        ``""`` otherwise."""
        if self._told_reentrant or job.status is not JobStatus.Abandoned:
            return ""
        reason = job.exception or ""
        if " was lost" not in reason and " stopped: " not in reason:
            return ""  # not a lost node's (no node left at all, say)
        options = getattr(self.cluster, "_options", None)
        if options is None or getattr(options, "reentrant", True):
            return ""  # reentrant: it ran out of attempts
        self._told_reentrant = True
        return (
            "dispynb: a job whose node is lost ends Abandoned; with %%dispy "
            "--reentrant (reentrant=True) such jobs run again on another node (for "
            "functions that may safely run twice)\n"
        )

    def _where_failed(self, job: DispyJob) -> str:
        """``" on local-1 (127.0.0.1:40331)"``: the node a failed job ended on;
        its address alone if the run did not hear which node that was."""
        node = self._ran_on.get(job.id)
        if node is None:
            return f" on {job.ip_addr}" if job.ip_addr else ""
        address = format_address(node.ip_addr, node.port)
        return f" on {node.name} ({address})" if node.name else f" on {address}"

    def ended_jobs(self) -> list[tuple[DispyJob, str | None]]:
        """The run's jobs that ended, in input order, each with the node it ran
        on (``HOST:PORT``; its address alone if the run did not hear which node):
        what a web monitor made after they ended lists, since their cluster no
        longer holds them."""
        with self._lock:
            jobs = list(self.jobs)
            ran_on = dict(self._ran_on)
        ended = []
        for job in jobs:
            if job.status.is_final:
                node = ran_on.get(job.id)
                where = node and format_address(node.ip_addr, node.port)
                ended.append((job, where or job.ip_addr))
        return ended

    def _nodes_ran_on(self) -> list[str]:
        """Where the run's jobs ran, each node once, as the cell names nodes
        (``local-1 (127.0.0.1:40331)``): several nodes of one address (``%dispy
        local --nodes 2``) are told apart; a job whose node the run did not hear
        counts by its address."""
        with self._lock:
            jobs = list(self.jobs)
            ran_on = dict(self._ran_on)
        shown = set()
        for job in jobs:
            node = ran_on.get(job.id)
            if node is not None:
                address = format_address(node.ip_addr, node.port)
                shown.add(f"{node.name} ({address})" if node.name else address)
            elif job.ip_addr:
                shown.add(job.ip_addr)
        return sorted(shown)

    def _summary(self, writer: Writer) -> None:
        for kind, jobs in self._failure_kinds.items():
            if len(jobs) > 1:
                writer(
                    "stderr",
                    f"{len(jobs)} jobs failed ({kind}), input "
                    f"{self._index.get(jobs[0].id)} shown above; "
                    f"see {self._reach('failures')} or {self._reach('df.exception')}\n",
                )


#: A traceback's last line for a file a job did not find: the path it gave.
_NOT_FOUND = re.compile(r"^FileNotFoundError: .*No such file or directory: '(.+)'$")


def _missing_file_hint(job: DispyJob) -> str:
    """A line saying where a job looked for a file it did not find by a relative
    path, and how to send it; ``""`` for any other failure."""
    lines = (job.exception or "").strip().splitlines()
    found = _NOT_FOUND.match(lines[-1].strip()) if lines else None
    if found is None or os.path.isabs(found.group(1)):
        return ""
    path = found.group(1)
    return (
        f"dispynb: a job looks for {path!r} in a directory of its own on its node, "
        f"not in the notebook's: send the file with the run (%%dispy --depends "
        f'"[{path!r}]"), or open it by its absolute path on nodes that share this '
        "machine's files\n"
    )


#: A traceback's last line for a global the job's function did not find.
_NAME_ERROR = re.compile(r"^NameError: name '(\w+)' is not defined")


def _missing_name_hint(job: DispyJob) -> str:
    """A line saying that the notebook lacks the name a job did not find either
    (cells run out of order: the function takes the notebook's names as they are
    when the run starts); ``""`` for any other failure, or out of a notebook."""
    lines = (job.exception or "").strip().splitlines()
    found = _NAME_ERROR.match(lines[-1].strip()) if lines else None
    if found is None or "IPython" not in sys.modules:  # a script: no notebook
        return ""
    from IPython import get_ipython

    shell = get_ipython()
    name = found.group(1)
    if shell is None or name in shell.user_ns:
        return ""
    return (
        f"dispynb: {name!r} is not defined in the notebook either: run the cell "
        "that defines it, then this one again (a job takes the notebook's names "
        "its function uses as they are when the run starts), or make it in the "
        "run's --setup\n"
    )


#: ``/tmp/ipykernel_12/345.py:4:``: a warning's file and line, as Python writes it.
_WARNING_PLACE = re.compile(r"^(\S+\.py)(?=:\d+: )", re.MULTILINE)


def _cells_named(text: str) -> str:
    """A job's stderr with the notebook's cells named as the cell shows them
    (``Cell In[3]:4: UserWarning: ...``), not by the kernel's temporary files of
    their code (``/tmp/ipykernel_12/345.py:4: ...``), which name no cell."""
    if ".py:" not in text:
        return text
    return _WARNING_PLACE.sub(lambda m: cell_name(m.group(1)) or m.group(1), text)


def _print_writer(stream: str, text: str) -> None:
    target = sys.stdout if stream == "stdout" else sys.stderr
    target.write(text)
    target.flush()


def _clip(text: str, label: str, where: str) -> str:
    """``text`` labelled (`_prefix_lines`); if longer than `JOB_SHOWN` characters or
    `JOB_LINES` lines, only its first and last lines (a quarter of each for the
    last), and a line saying how much is left out and that ``where`` has it."""
    if len(text) <= JOB_SHOWN and text.count("\n") <= JOB_LINES:
        return _prefix_lines(text, label)
    head = _lines_within(text[: JOB_SHOWN - JOB_TAIL], JOB_LINES * 3 // 4)
    tail = _lines_within(text[-JOB_TAIL:][::-1], JOB_LINES // 4, last=True)[::-1]
    hidden = text[len(head) : len(text) - len(tail)]
    lines = hidden.count("\n")
    note = (
        f"... {len(hidden):,} characters ({lines:,} line{'s' * (lines != 1)}) "
        f"not shown; {where} has them all"
    )
    return _prefix_lines(head, label) + f"{label}{note}\n" + _prefix_lines(tail, label)


def _lines_within(text: str, most: int, last: bool = False) -> str:
    """The whole lines of ``text`` from its start, at most ``most`` of them; ``text``
    itself if it has no line break (a line longer than the room: its start).
    ``last``: ``text`` is reversed (the end of an output), its first character the
    output's final line break, which does not count."""
    skip = 1 if last and text.startswith("\n") else 0
    end = skip
    for _ in range(most):
        found = text.find("\n", end)
        if found < 0:
            break
        end = found + 1
    if end == skip:
        return text  # no whole line fits: a part of one
    return text[: end - 1] if last else text[:end]


def _prefix_lines(text: str, label: str) -> str:
    """``text`` with ``label`` before each of its lines, ending with a newline; a
    line redrawn after carriage returns (a progress bar) as a terminal shows it."""
    lines = text.replace("\r\n", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()  # the text's final line break
    return "".join(f"{label}{_as_drawn(line)}\n" for line in lines)


def _as_drawn(line: str) -> str:
    """What a terminal shows of ``line``: each ``\\r`` returns to its start, and the
    text after it writes over what was there."""
    if "\r" not in line:
        return line
    shown = ""
    for part in line.split("\r"):
        shown = part + shown[len(part) :]
    return shown


def exception_kind(exception: str | None) -> str:
    """``'ValueError'`` from a traceback's last line; for a reason that is no
    exception's line, the reason up to its first ``": "``, without its details in
    brackets: ``'node 10.0.0.7:9700 was lost'`` (a colon inside a node's address is
    no separator: every lost node's jobs read ``'node 10.0.0.7'`` before)."""
    if not exception:
        return "failure"
    exception = without_client_advice(exception)  # its last line is no exception's
    lines = [line for line in exception.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else exception
    named = _EXCEPTION_LINE.match(last)
    if named:
        return named.group(1)
    return _without_details(last.split(": ", 1)[0]) or "failure"


#: A traceback's last line: ``ValueError: ...``, ``pkg.Error: ...``, ``KeyError``.
_EXCEPTION_LINE = re.compile(r"([A-Za-z_][\w.]*)(?::\s|:?$)")


def _without_details(reason: str) -> str:
    """``reason`` without the details in brackets at its end: ``'... was lost (no
    pulse for 3 s)'``, ``'... exited with status 3 (os._exit() or ...)'``."""
    reason = reason.rstrip()
    if not reason.endswith(")"):
        return reason
    depth = 0
    for at in range(len(reason) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(reason[at], 0)
        if depth == 0:
            return reason[:at].rstrip() or reason
    return reason  # unbalanced: as it is
