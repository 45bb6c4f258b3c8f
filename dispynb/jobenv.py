"""What a computation finds where its jobs run, the same on every engine.

dispynb's node server (``nodeserver``), the Dask engine's worker host and the Ray
engine's actors all give a dispy computation the same surroundings: the standard
modules dispy's node put in its globals (`DISPY_MODULES`), dispy's names added to
the globals without replacing the user's own (`inject_names`), dispy's rule for a
successful ``setup`` (`setup_failure`), the ``dispynode_logger`` (`node_logger`),
the job's traceback without the runner's frame (`format_job_exception`), with the
call and the limit that failed it (`describe_failure`), why a job was stopped
(`timeout_reason`, `TERMINATED_AT_REQUEST`), the interrupt stopping it
(`node_interrupt`), the per-job ``mem_limit``
(`limit_memory`), what ``dispy_send_file`` returns and says
(`file_sent`). Standard library only: it is imported by
node processes and engines' workers, which must start light.
"""

from __future__ import annotations

import errno
import importlib
import io
import logging
import os
import resource
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable
from types import ModuleType, TracebackType
from typing import Any, TextIO

#: Standard modules dispy computations use without importing them (dispy exec'd the
#: computation into its node's module globals; see reference/dispy.md section 3.10).
DISPY_MODULES = (
    "os",
    "sys",
    "time",
    "socket",
    "multiprocessing",
    "threading",
    "subprocess",
    "traceback",
    "marshal",
    "tempfile",
    "shutil",
    "glob",
    "pickle",
    "io",
    "signal",
    "platform",
    "copy",
    "struct",
    "hashlib",
    "re",
    "errno",
)

#: Return values of setup that mean success (dispy's 0, 1 and 2, or nothing).
SETUP_SUCCESS = (0, 1, 2)


def implicit_modules() -> dict[str, ModuleType]:
    """``{name: module}`` of `DISPY_MODULES`, imported."""
    return {name: importlib.import_module(name) for name in DISPY_MODULES}


def inject_names(functions: Iterable[Any], names: dict[str, Any]) -> None:
    """Add ``names`` to each function's globals, never replacing the user's own."""
    done: set[int] = set()
    for function in functions:
        namespace = getattr(function, "__globals__", None)
        if not isinstance(namespace, dict) or id(namespace) in done:
            continue
        done.add(id(namespace))
        for name, value in names.items():
            namespace.setdefault(name, value)


def setup_failure(result: Any) -> str | None:
    """None if ``result`` (what setup returned) means success, else why not."""
    if result is None or (isinstance(result, int) and result in SETUP_SUCCESS):
        return None
    text = repr(result)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"setup returned {text}; success is None, 0, 1 or 2"


def node_logger(debug: bool = False) -> logging.Logger:
    """dispy's ``dispynode_logger``: the ``dispynode`` logger, writing to the node's
    own stderr (``sys.__stderr__``: a job's ``sys.stderr`` is its captured output),
    level INFO, DEBUG with ``debug`` (the node runs with ``-d``); a job may change
    its level."""
    log = logging.getLogger("dispynode")
    if not log.handlers:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(
            logging.Formatter("%(asctime)s dispynode %(levelname)s %(message)s")
        )
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if debug:
        log.setLevel(logging.DEBUG)
    return log


def refused_shutdown(worker: str) -> Callable[[], int]:
    """dispy's ``dispynode_shutdown`` for a job on another engine's ``worker`` (``'a
    Dask worker'``...): it logs that the worker is not dispynb's to stop, and
    returns -1, as a node that does not allow it does."""

    def dispynode_shutdown() -> int:
        node_logger().warning("dispynode_shutdown: %s is not dispynb's to stop", worker)
        return -1

    return dispynode_shutdown


def format_job_exception(exc: BaseException) -> str:
    """Traceback text of a job's exception, without the runner's own frame (the
    outermost); ``sys.exit`` in a job is named as such."""
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None else None
    if isinstance(exc, SystemExit):
        lines = []
        if tb is not None:
            lines = ["Traceback (most recent call last):\n", *traceback.format_tb(tb)]
        lines.append(f"SystemExit: the job called sys.exit({exc.code!r})\n")
        return "".join(lines)
    return format_exception(exc, tb)


def format_exception(exc: BaseException, tb: TracebackType | None) -> str:
    """``traceback.format_exception`` of ``exc`` from ``tb``; if that raises
    (the exception's ``__getattr__`` raising other than AttributeError for
    ``__notes__``, say), its frames and a line naming it: formatting a job's
    exception must not end the worker reporting it."""
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception as error:
        frames = traceback.format_tb(tb) if tb is not None else []
        head = ["Traceback (most recent call last):\n", *frames] if frames else []
        name = type(exc).__module__ + "." + type(exc).__qualname__
        if type(exc).__module__ == "builtins":
            name = type(exc).__qualname__
        return "".join(head) + (
            f"{name}: <the exception cannot be formatted: "
            f"{type(error).__name__}: {error}>\n"
        )


def call_mismatch(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: BaseException,
) -> str:
    """A line saying how a job was called, when its ``TypeError`` is the call's
    (the arguments given to ``submit`` do not fit the function); else ``""``.

    Python's message names what is missing or extra, not what the job was given:
    this shows the call and the function's parameters, as a local traceback shows
    the line that called it."""
    tb = exc.__traceback__
    if not isinstance(exc, TypeError) or (tb is not None and tb.tb_next is not None):
        return ""  # raised inside the function: its own traceback says where
    import inspect  # only now: node processes start without it
    import reprlib

    try:
        signature = inspect.signature(func)
        signature.bind(*args, **kwargs)
    except TypeError:  # the call does not fit: the mistake this explains
        pass
    except ValueError:  # a callable without a signature (some builtins)
        return ""
    else:
        return ""
    shown = reprlib.Repr()  # no keywords before Python 3.12
    shown.maxlevel, shown.maxstring, shown.maxother = 2, 40, 40
    given = [shown.repr(arg) for arg in args]
    given += [f"{key}={shown.repr(value)}" for key, value in kwargs.items()]
    name = getattr(func, "__name__", type(func).__name__)
    return (
        f"(the job called {name}({', '.join(given)}); {name} takes {signature}: "
        "give submit() the function's arguments)\n"
    )


def describe_failure(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: BaseException,
    mem_limit: int | None = None,
) -> str:
    """The text a job that raised ``exc`` reports, the same on every engine: its
    traceback (`format_job_exception`), the call when it did not fit the function
    (`call_mismatch`), and the job's ``mem_limit`` when it ran out of memory under
    one."""
    text = format_job_exception(exc) + call_mismatch(func, args, kwargs, exc)
    # mmap and other system calls refused for the limit raise OSError(ENOMEM).
    refused = isinstance(exc, OSError) and exc.errno == errno.ENOMEM
    if mem_limit is not None and (isinstance(exc, MemoryError) or refused):
        text += (
            f"(the job ran with a mem_limit of {mem_limit} bytes of address space: "
            "mem_limit / dispy_job_mem_limit; give a larger limit, or None for none)\n"
        )
    return text


#: Why a running job a cancel stopped ended ``Terminated``.
TERMINATED_AT_REQUEST = "job terminated at the client's request"


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; ``signal 64`` for a number Python has no name for."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def crash_reason(returncode: int) -> str:
    """Explain how a worker process ended, for the job that was running in it."""
    if returncode < 0:
        name = signal_name(-returncode)
        return f"the job's worker process was killed by {name} ({-returncode})"
    return (
        f"the job's worker process exited with status {returncode} "
        "(os._exit() or a fatal error in an extension)"
    )


def mem_limit_note(mem_limit: int | None) -> str:
    """Appended to the crash reason of a job that ran under a memory limit ("" for
    None: no limit)."""
    if mem_limit is None:
        return ""
    return (
        f"; it probably exceeded mem_limit of {mem_limit} bytes (mem_limit / "
        "dispy_job_mem_limit): give a larger limit, or None for none"
    )


def node_output_cap(max_message: int) -> int:
    """Characters of each output stream a node of ``max_message`` bytes a message
    keeps of a job, whatever its client asks: a quarter of its messages, as UTF-8
    (up to 4 bytes a character) for two streams; the rest is the result's."""
    return max(max_message // 32, 1)


#: Bytes the note of a kept output (`with_dropped_note`) or traceback takes at most.
NOTE_BYTES = 1024


def output_bytes(limit: int) -> int:
    """Bytes in UTF-8 of a job's output kept to ``limit`` characters, its note
    included: 4 a character, 6 for a lone surrogate (a file name decoded with
    ``os.fsdecode``), which goes as its escape (``\\udcff``)."""
    return 6 * limit + NOTE_BYTES


#: Why a job's output was cut when the client's limit cut it, and how to keep more.
OUTPUT_OPTION = (
    "the cluster's max_output_size: JobCluster(..., max_output_size=N) keeps N, "
    "None keeps all"
)


def output_limit(limit: int, node_max_message: int = 0) -> str:
    """Which limit kept a job's output to ``limit`` characters, and how to raise it:
    the client's ``max_output_size``, or the node's own cap (`node_output_cap` of
    its ``node_max_message``; 0: not known), which a larger max_output_size does
    not raise."""
    if node_max_message and limit >= node_output_cap(node_max_message):
        return (
            "the node's own cap, a quarter of its --max-message-size of "
            f"{node_max_message} bytes: start the node with a larger one"
        )
    return OUTPUT_OPTION


def with_dropped_note(
    text: str, dropped: int, name: str, limit: int, why: str = OUTPUT_OPTION
) -> str:
    """A job's ``text`` of ``name`` (``stdout``, ``stderr``) kept to ``limit``
    characters (by ``why``: `output_limit`), with the line that says how many were
    dropped if any (the same words on dispynb's nodes and the engines)."""
    if not dropped:
        return text
    if text and not text.endswith("\n"):
        text += "\n"
    return text + (
        f"[dispynb: {dropped} more characters of {name} dropped: a job keeps "
        f"{limit} ({why})]\n"
    )


class CappedOutput(io.StringIO):
    """A job's stdout or stderr (``name``): keeps its first ``limit`` characters
    (None: all) and counts the rest as they come, so that a job printing much holds
    no more than that; `text` says how many were dropped, in the nodes' words."""

    def __init__(self, name: str, limit: int | None) -> None:
        super().__init__()
        self.name = name
        self.limit = limit
        self.dropped = 0

    def write(self, text: str) -> int:
        room = None if self.limit is None else self.limit - self.tell()
        if room is not None and len(text) > room:
            self.dropped += len(text) - max(room, 0)
            if room > 0:
                super().write(text[:room])
            return len(text)
        return super().write(text)

    def text(self) -> str:
        """What was kept, with the line `with_dropped_note` adds if any was not."""
        return with_dropped_note(
            self.getvalue(), self.dropped, self.name, self.limit or 0
        )


#: The attribute marking the KeyboardInterrupt a node raises in a job it stops.
_NODE_STOP = "_dispynb_node_stop"


def node_interrupt() -> KeyboardInterrupt:
    """The KeyboardInterrupt a node raises in a job it stops (a cancel, its
    job_timeout): marked, so that a runner of calls (the executor's) tells it
    from one a call raises itself, which is that call's outcome
    (`stopped_by_node`)."""
    interrupt = KeyboardInterrupt()
    setattr(interrupt, _NODE_STOP, True)
    return interrupt


def stopped_by_node(exc: BaseException) -> bool:
    """Whether ``exc`` is the node's interrupt of the job (`node_interrupt`),
    re-raised as it was or not. (Read from its ``__dict__``: any exception a
    job raises comes here, its ``__getattr__`` raising what it likes.)"""
    return isinstance(exc, KeyboardInterrupt) and vars(exc).get(_NODE_STOP) is True


def timeout_reason(timeout: float) -> str:
    """Why a job that ran over its time limit was terminated, and how to allow more."""
    return (
        f"the job ran over its time limit of {timeout:g} s (job_timeout / "
        "dispy_job_timeout) and was terminated; give a larger limit, e.g. "
        f"submit(..., dispy_job_timeout={max(timeout * 2, 1):g}), or None for none"
    )


def name_for_client(path: str, job_dir: str | None = None) -> str:
    """The name under which the client saves a file a job sends
    (``dispy_send_file``): its path relative to the job's directory (``job_dir``,
    default the working directory) when it is inside, else its base name."""
    full = os.path.abspath(path)
    base = os.path.realpath(job_dir or os.getcwd())
    if full.startswith(base.rstrip(os.sep) + os.sep):
        return os.path.relpath(full, base).replace(os.sep, "/")
    return os.path.basename(full)


def limit_memory(mem_limit: int) -> tuple[int, int]:
    """Lower the soft ``RLIMIT_AS`` to ``mem_limit`` for one job; the limits to
    restore after it.

    Only the soft limit changes, so the process (reused for the next job) can raise
    it again; a hard limit below ``mem_limit`` stays in force.
    """
    saved = resource.getrlimit(resource.RLIMIT_AS)
    hard = saved[1]
    soft = mem_limit if hard == resource.RLIM_INFINITY else min(mem_limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return saved


def send_file_timeout(timeout: Any) -> float | None:
    """``dispy_send_file``'s ``timeout``: seconds to wait for the client's answer
    (None: no limit)."""
    if timeout is None:
        return None
    seconds = float(timeout)
    if seconds != seconds or seconds < 0:
        raise ValueError(f"timeout must be None or seconds >= 0, not {timeout!r}")
    return seconds


#: Longest single wait for a file's answer (`dispy_send_file`): then whether the
#: job that sent it still runs is checked (a thread it started may be the one
#: waiting). A poll takes milliseconds in a C int (24.8 days): a longer timeout
#: (infinity, too) waits in turns anyway.
ANSWER_SLICE = 0.05

#: Why ``dispy_send_file`` returns -1 in a thread whose job returned while it
#: waited for the client's answer: the file went out, but the job's channel is
#: its runner's again (maybe the next job's), which alone reads it. Shown as
#: "not confirmed" (`file_sent`): whether the client wrote the file is not known.
JOB_ENDED = (
    "the job returned while a thread it started waited for the client's answer, "
    "so whether the client wrote the file is not known: have the job wait for "
    "(join) the threads that send files before it returns"
)


#: Why a file or provisional result from a thread whose job has returned is not
#: sent (`JobThreads`): whatever job runs now, it is not that job's.
FROM_AN_ENDED_JOB = (
    "the job that sent it had returned (it was sent by a thread the job left "
    "running): not sent; wait for the threads that send files or provisional "
    "results before the job returns"
)


def _threads() -> int:
    """How many threads run (started ones: a thread is in ``threading._active``
    once its ``start()`` returned). ``threading.active_count()`` takes a lock,
    ~0.4 us, twice a job on the path trivial jobs take thousands of times a
    second; the dict's length, read under the GIL, ~30 ns."""
    return len(_ACTIVE) if _ACTIVE is not None else threading.active_count()


#: ``threading._active`` where the interpreter has it (CPython 3.8 to 3.13).
_ACTIVE: dict[int, threading.Thread] | None = getattr(threading, "_active", None)


class JobThreads:
    """The job each thread belongs to, in a process that runs jobs one after
    another: a thread a job started may run on once it returned, and call
    ``dispy_send_file`` or ``dispy_provisional_result``, or print, while the
    process runs another job, which what it sends or prints is not.

    `begin` and `end` bracket each job (on the thread that runs it); each thread
    that appeared meanwhile is that job's. Threads older than the first job
    (setup's) count as any job's. A job alone in its process (the usual case)
    costs a thread count at each end (`_threads`).
    """

    def __init__(self) -> None:
        self._job = 0  # the job running or last run, numbered from 1
        self._owners: weakref.WeakKeyDictionary[threading.Thread, int] = (
            weakref.WeakKeyDictionary()
        )
        self._before: set[threading.Thread] | None = None  # None: the main alone
        #: A thread an earlier job started runs as this job begins (`begin`).
        self.left = False

    def begin(self) -> None:
        """A job starts."""
        self._job += 1
        if _threads() > 1:
            self._before = set(threading.enumerate())
            owners = self._owners
            self.left = bool(owners) and any(t in owners for t in self._before)
        else:
            self._before = None
            self.left = False

    def end(self) -> None:
        """The job begun returned: the threads it started are its own."""
        if _threads() > 1:
            before = self._before or ()
            main = threading.main_thread()
            for thread in threading.enumerate():
                if thread not in before and thread is not main:
                    self._owners.setdefault(thread, self._job)

    def of_this_job(self) -> bool:
        """Whether the calling thread is the job's begun last (not one an earlier
        job started)."""
        if not self._owners:
            return True
        owner = self._owners.get(threading.current_thread())
        return owner is None or owner == self._job


class JobStream(io.TextIOBase):
    """One of the ``sys.stdout`` and ``sys.stderr`` of a process that runs jobs one
    after another: the same object for every job (`JobStreams`), so that what kept
    it (a log handler ``logging.basicConfig()`` made in a job, a library that took
    ``sys.stdout`` at import) writes into the output of the job running then, as
    in dispy, where each job has a process of its own. What is written while no
    job runs goes to `own`, the process's own stream, and so does what a thread
    an earlier job left running writes (`JobThreads.left`).

    ``write`` is set per job (`JobStreams`) to the target's own method: no check
    per write, unless a thread an earlier job left runs.
    """

    def __init__(self, threads: JobThreads | None) -> None:
        super().__init__()
        #: The process's stream (None if it has none): the one ``sys`` had as a
        #: job began (`JobStreams.begin`).
        self.own: TextIO | None = None
        self.own_write: Callable[[str], int] = len  # nowhere to write: dropped
        #: The running job's output, None between jobs.
        self.capture: TextIO | None = None
        self._threads = threads
        # An instance attribute, found before the class's method: print() and
        # logging call the capture's (C) write directly.
        self.write = self.own_write  # type: ignore[method-assign]

    def adopt(self, own: TextIO | None) -> None:
        """``own`` is the process's stream now."""
        self.own = own
        self.own_write = len if own is None else own.write

    def _target(self) -> TextIO | None:
        capture = self.capture
        threads = self._threads
        if capture is None or (threads is not None and not threads.of_this_job()):
            return self.own
        return capture

    def write_routed(self, text: str) -> int:
        """`write` while a thread an earlier job left runs: the running job's
        threads write into its output, that thread to `own`."""
        stream = self._target()
        return len(text) if stream is None else stream.write(text)

    def flush(self) -> None:
        stream = self._target()
        if stream is not None:
            stream.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing: a job does not close the streams of the jobs after it."""


class JobStreams:
    """A process's `JobStream` ``stdout`` and ``stderr``, made once, that are its
    ``sys.stdout`` and ``sys.stderr`` while a job runs (`begin` to `end`).

    ``threads`` (if the process tracks them) tells which thread is the running
    job's: what a thread an earlier job left running writes goes to the process's
    own streams, not into the running job's output.
    """

    def __init__(self, threads: JobThreads | None = None) -> None:
        self.stdout = JobStream(threads)
        self.stderr = JobStream(threads)
        self._threads = threads

    def begin(self, out: TextIO, err: TextIO) -> None:
        """A job starts (after ``threads.begin()``): what is written goes to ``out``
        and ``err``. The streams ``sys`` has are the process's own: `end` puts
        them back."""
        stdout, stderr = self.stdout, self.stderr
        found_out, found_err = sys.stdout, sys.stderr
        # Else a job began and did not end, or the same as last job's: kept.
        if found_out is not stdout and found_out is not stdout.own:
            stdout.adopt(found_out)
        if found_err is not stderr and found_err is not stderr.own:
            stderr.adopt(found_err)
        stdout.capture, stderr.capture = out, err
        threads = self._threads
        if threads is not None and threads.left:
            stdout.write = stdout.write_routed  # type: ignore[method-assign]
            stderr.write = stderr.write_routed  # type: ignore[method-assign]
        else:
            stdout.write = out.write  # type: ignore[method-assign]
            stderr.write = err.write  # type: ignore[method-assign]
        sys.stdout, sys.stderr = stdout, stderr

    def end(self) -> None:
        """The job returned: the process's own streams are ``sys``'s again (even
        if the job replaced them), and what kept ours writes to them."""
        stdout, stderr = self.stdout, self.stderr
        stdout.capture = stderr.capture = None
        stdout.write = stdout.own_write  # type: ignore[method-assign]
        stderr.write = stderr.own_write  # type: ignore[method-assign]
        sys.stdout, sys.stderr = stdout.own, stderr.own


def unconfirmed(timeout: float | None) -> str:
    """Why ``dispy_send_file`` returns -1 when the client's answer did not come in
    ``timeout`` seconds."""
    return (
        f"the client did not confirm it within {timeout} s (it may still arrive): "
        "give dispy_send_file a longer timeout, or None to wait for the answer"
    )


def file_sent(path: str, error: str | None) -> int:
    """``dispy_send_file``'s return value, its reason on the job's stderr (the
    process's own for a thread of a job that returned): 0 once the client wrote
    ``path`` (``error`` empty), -1 if not or not known (``error`` says why);
    ``error`` None: sent from a process the job started, which gets no answer."""
    if error is None:
        print(
            f"dispy_send_file: {path!r} sent from a process the job started: "
            "whether the client wrote it is not known here (call dispy_send_file "
            "in the job's own process to learn it)",
            file=sys.stderr,
        )
    elif error:
        # From a thread of a job that returned, the captured stderr is the next
        # job's: the process's own takes it instead.
        stream = sys.__stderr__ if error == FROM_AN_ENDED_JOB else sys.stderr
        what = "not confirmed" if error == JOB_ENDED else "not sent"  # it went out
        if stream is not None:
            print(f"dispy_send_file: {path!r} {what}: {error}", file=stream)
        return -1
    return 0


__all__ = [
    "DISPY_MODULES",
    "FROM_AN_ENDED_JOB",
    "JOB_ENDED",
    "SETUP_SUCCESS",
    "TERMINATED_AT_REQUEST",
    "CappedOutput",
    "JobStream",
    "JobStreams",
    "JobThreads",
    "call_mismatch",
    "describe_failure",
    "file_sent",
    "format_job_exception",
    "implicit_modules",
    "inject_names",
    "limit_memory",
    "mem_limit_note",
    "node_logger",
    "refused_shutdown",
    "send_file_timeout",
    "setup_failure",
    "timeout_reason",
    "unconfirmed",
]
