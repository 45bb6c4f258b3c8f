"""How an `Executor`'s jobs reach their callers: the future of a ``submit``
(`CallsFuture`), the outcomes of a ``map`` chunk (`chunk_outcomes`), the exception of
a call that raised (`call_error`), and what the calls printed, written where the
caller runs (`echo`, `cell_output`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import sys
from collections.abc import Iterable
from typing import Any

from dispynb.celloutput import MapOutput, cell_context, in_kernel
from dispynb.errors import RemoteError
from dispynb.executorfailures import executor_advice, explain_failure
from dispynb.executorrunner import Failure, Outcomes
from dispynb.futures import JobFuture, outcome_error
from dispynb.job import DispyJob
from dispynb.protocol import serialize
from dispynb.tracebacks import DYNAMIC_CODE, LazySourceMap, explain_missing_module


def call_error(
    failure: Failure,
    sources: tuple[Any, ...],
    mem_limit: int | None,
    allowed: serialize.AllowList | None = None,
) -> BaseException:
    """The exception of a call that raised (its cause: the remote traceback, its
    frames in the code of ``sources`` pointing at their file or cell again, with
    their source lines, as a local traceback and ProcessPoolExecutor's show them);
    a MemoryError under the executor's ``mem_limit`` says how to allow more.
    One that cannot be unpickled here (under ``allowed``, the cluster's
    ``result_types``) is a `RemoteError` saying why.
    Never raised here, so no frame of this module is in its traceback."""
    exc, text, name, message = failure
    if isinstance(exc, bytes):
        try:
            exc = serialize.loads([memoryview(exc)], allowed)
        except Exception as error:
            exc = None
            # Refused by result_types, the error says how to allow it.
            fix = (
                ""
                if allowed is not None and "result_types" in str(error)
                else (": install here what it needs, as on the node")
            )
            text += (
                f"[dispynb: the {name} raised cannot be unpickled here ({error}), "
                f"so it is raised as this RemoteError{fix}]\n"
            )
    text = LazySourceMap(*sources).rerender(text) or text
    # A module the node lacks (imported in the call): how to send it, as for a job.
    remote = RemoteError(name, message, executor_advice(explain_missing_module(text)))
    if not isinstance(exc, BaseException):  # None: it did not unpickle here
        return remote
    exc.__cause__ = remote
    if mem_limit is not None and isinstance(exc, MemoryError):
        exc.add_note(
            f"The call ran with a mem_limit of {mem_limit} bytes of address space "
            "(the executor's mem_limit): give a larger limit, e.g. "
            f"Executor(..., mem_limit={2 * mem_limit}), or None for none."
        )
    return exc


class CallsFuture(JobFuture):
    """The future of a ``submit``: its job makes one call. (A ``map`` waits for
    its jobs themselves: `chunk_outcomes`.)"""

    def __init__(
        self,
        job: DispyJob,
        sources: tuple[Any, ...],
        mem_limit: int | None,
        allowed: serialize.AllowList | None,
        batch: str = "",
    ) -> None:
        super().__init__(job)
        self._sources = sources  # the code its traceback's frames come from
        self._mem_limit = mem_limit
        self._allowed = allowed
        self._batch = batch  # what the call returns the values of (`_submit_call`)
        # In a notebook, the output goes to the cell that called submit.
        self._cell = cell_context()

    def _settle(self) -> None:
        job = self.job
        # Before the result: a waiting caller reads it first.
        if self._cell is None:
            echo(job, self._sources)
        else:
            self._cell.run(echo, job, self._sources)
        if job.status == job.Finished:
            values, failures = job.result
            if failures:
                failure = call_error(
                    failures[0], self._sources, self._mem_limit, self._allowed
                )
                self._set(failure, error=True)
            else:
                self._set(values[0], error=False)
        else:  # a failure of the whole job
            explain_failure(job, self._sources, self._batch)
            super()._settle()

    def _what(self) -> str:
        """The call, named by its function (the job is the executor's own)."""
        what = self._batch or f"call {call_name(self._sources[0])}(...)"
        return f"the {what} (job {self.job.id!r})"

    def _set(self, value: Any, error: bool) -> None:
        try:
            if error:
                self.set_exception(value)
            else:
                self.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile


def chunk_outcomes(
    job: DispyJob,
    timeout: float | None,
    sources: tuple[Any, ...],
    output: MapOutput | None = None,
) -> Outcomes:
    """The outcomes of a ``map`` job's calls, or raise what its future's
    ``result(timeout)`` would (`JobFuture`). Waiting on the job itself, the
    waiting thread reads the nodes' answers in the I/O thread's place when that
    one is idle (`dispynb._inplace`): no thread is woken per job."""
    if not job.wait(timeout):
        raise concurrent.futures.TimeoutError()
    if output is None:
        echo(job, sources)
    else:  # written once, maybe already as the job ended (`cell_output`)
        output.echo(job)
    if job.status == job.Finished:
        outcomes: Outcomes = job.result
        return outcomes
    if job.status == job.Cancelled:
        raise concurrent.futures.CancelledError()
    explain_failure(job, sources)
    count = job._args[2]
    name = call_name(sources[0])
    calls = f"the call {name}(...)" if count == 1 else f"the {count} calls of {name}"
    error = outcome_error(job, f"{calls} (job {job.id!r})")
    assert error is not None
    raise error


def cell_output(jobs: Iterable[DispyJob], sources: tuple[Any, ...]) -> MapOutput | None:
    """In a notebook, a map's output is written as each job ends, in the cell that
    called ``map`` (even if it is never iterated: `dispynb.celloutput`);
    elsewhere (None) as the iteration reaches each job."""
    if not in_kernel():
        return None
    return MapOutput.follow(jobs, functools.partial(echo, sources=sources))


def echo(job: DispyJob, sources: tuple[Any, ...]) -> None:
    """Write here what a job's calls printed (stdout, stderr, warnings), as
    ProcessPoolExecutor's workers write to the terminal they share with the
    script: once the job has ended, not as it runs (``future.job.stdout`` keeps
    it too). Its warnings and tracebacks in the code of ``sources`` (the calls'
    functions) name their file and line, as there."""
    if isinstance(job.stderr, str) and DYNAMIC_CODE in job.stderr:
        job.stderr = LazySourceMap(*sources).rerender(job.stderr)
    for text, stream in ((job.stdout, sys.stdout), (job.stderr, sys.stderr)):
        if text and stream is not None:
            if isinstance(text, bytes):
                text = text.decode(errors="replace")
            stream.write(text)
            stream.flush()


def call_name(fn: Any) -> str:
    """How a call's function is named in an error (its qualified name)."""
    fn = getattr(fn, "func", fn)  # a functools.partial: its function
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)
