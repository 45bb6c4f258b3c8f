"""What runs inside Ray's worker processes for a dispynb computation.

`JobActor` is a Ray actor, one per CPU the cluster uses: its constructor is dispy's
node set-up for one worker (a directory of its own with the ``depends`` files, the
computation unpickled with dispy's names in its globals, ``setup`` run), its
``run`` method runs one job and captures its stdout and stderr, its ``cleanup``
method runs dispy's ``cleanup`` before the cluster lets the actor go. The client
kills an actor to stop the job it runs (Ray cannot interrupt a running actor task);
Ray then restarts it (the constructor, hence ``setup``, runs again).

What a running job sends before it ends (``dispy_provisional_result``,
``dispy_send_file``) goes to the client through the engine's `Inbox` actor
(`dispynb.backends._rayinboxactor`).

This module is imported by Ray's workers and by the client (which only needs the
classes to make actors of); it imports neither ``ray`` nor anything heavy at module
level.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import importlib
import logging
import os
import pickle
import platform
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from dispynb.backends._rayinboxactor import ANSWERS, KEEP_WAIT
from dispynb.jobenv import (
    FROM_AN_ENDED_JOB,
    CappedOutput,
    JobStreams,
    JobThreads,
    describe_failure,
    file_sent,
    implicit_modules,
    inject_names,
    limit_memory,
    name_for_client,
    node_logger,
    refused_shutdown,
    send_file_timeout,
    setup_failure,
)
from dispynb.protocol import serialize

#: Outcome codes of `JobActor.run` (the first item of its reply). SKIPPED: the
#: job was not run, its skip recorded (`JobActor.skip`) before its call began.
FINISHED = "finished"
RAISED = "raised"
SKIPPED = "skipped"
#: Finished, its result pickled here (``serialize.dumps``, its out-of-band buffers
#: as `pickle.PickleBuffer`: Ray carries them out of band too), for the client's
#: `load_result`: Ray then copies bytes instead of pickling the result again.
PICKLED = "pickled"

#: The `JobActor`'s concurrency group of `JobActor.skip` (one thread of its own):
#: it runs while a job runs in the default group, whose calls wait in order.
CONTROL = "control"

#: Jobs (``(key, attempt)``) a `JobActor` remembers having begun, for `JobActor.skip`
#: (more than the calls the client keeps in flight per actor, batches included).
BEGUN = 4096

#: Result types sent back without a check that they pickle.
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})


#: Seconds a job's ``os._exit`` waits for the inbox to take its exit status.
EXIT_WAIT = 5.0

#: The process's own ``os._exit`` (an actor's is `_exit_told`).
_EXIT = os._exit

#: The file of an actor's directory that outlives its process: the process's pid,
#: then what faulthandler writes there if a fatal signal ends it. The actor's next
#: life (Ray restarts it) reads it (`earlier_lives`) and tells the client, in an
#: inbox message of this kind, how the job running then ended.
LIFE = ".dispynb-life"

#: faulthandler's words for the fatal signals it reports.
_FATAL = {
    "Segmentation fault": signal.SIGSEGV,
    "Floating point exception": signal.SIGFPE,
    "Aborted": signal.SIGABRT,
    "Bus error": signal.SIGBUS,
    "Illegal instruction": signal.SIGILL,
}


class SetupFailed(Exception):
    """The computation could not be set up in this worker (the message says why;
    ``remote_traceback``: setup's own traceback, when setup raised)."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class _Job:
    """The job a `JobActor` runs now, for the functions a job may call."""

    key = 0
    attempt = 0
    sent = 0  # provisional results and files sent to the inbox by this job
    inbox: Any = None
    token = ""  # the cluster's, in its messages to the shared inbox
    pid = 0  # the actor's: a process the job forks waits for no answer


_CURRENT = _Job()
#: Which job the threads jobs started belong to: one a job left running sends
#: nothing, and prints nothing, as the actor's next job.
_THREADS = JobThreads()
#: The actor's sys.stdout and sys.stderr while a job runs, the same for all its
#: jobs: a stream a job kept (its log handler's) writes into the running job's
#: output; a thread an earlier job left running writes to the actor's own.
_STREAMS = JobStreams(_THREADS)


def dispy_provisional_result(
    result: Any, relay: bool = False, timeout: Any = None
) -> int:
    """Send ``result`` to the client now, as a provisional result of this job.

    Returns 0, or -1 if it could not be sent (the reason is logged). ``relay`` and
    ``timeout`` are accepted for dispy compatibility.
    """
    return _send("provisional", result)


def dispy_send_file(path: str, relay: bool = False, timeout: Any = None) -> int:
    """Send a file to the client, which saves it under the same relative path in
    its folder for received files (``files_dir``, its working directory by default).

    Returns 0 once the client wrote the file, -1 if it did not (unreadable, the
    client's disk full or its folder not writable, the cluster closed; the reason
    is printed on the job's stderr). ``timeout``: seconds to wait for the client's
    answer (None, the default, waits for it); ``relay`` is accepted for dispy
    compatibility. Called in a process the job started, it sends the file and
    returns 0 without the client's answer.
    """
    try:
        if not _THREADS.of_this_job():
            raise OSError(FROM_AN_ENDED_JOB)
        seconds = send_file_timeout(timeout)
        name = name_for_client(path)
        with open(path, "rb") as handle:
            data = handle.read()
        error = _send_file(name, data, seconds)
    except (OSError, ValueError) as exc:
        error = str(exc)
    return file_sent(path, error)


def _send_file(name: str, data: bytes, timeout: float | None) -> str | None:
    """Send a file through the inbox and wait for the client's answer there: ""
    once it wrote the file, else why not; None from a process the job started."""
    job = _CURRENT
    waits = os.getpid() == job.pid
    error = _put("file", (name, data, waits))
    if error:
        raise OSError(f"it could not be put in the client's Ray inbox: {error}")
    if not waits:
        return None
    ident = (job.key, job.attempt, job.sent - 1)
    call = job.inbox.wait_answer.options(concurrency_group=ANSWERS)
    ray = importlib.import_module("ray")
    try:
        return str(ray.get(call.remote(job.token, ident, timeout)))
    except Exception as exc:  # the inbox is gone: so is its client
        return (
            f"the client's Ray inbox did not answer ({type(exc).__name__}: {exc}): "
            "the client is gone"
        )


def _send(kind: str, value: Any) -> int:
    """Put a message of the running job in the inbox: 0, or -1 (why is logged)."""
    error = _put(kind, value)
    if error:
        logging.getLogger("dispynode").warning("%s not sent: %s", kind, error)
        return -1
    return 0


def _exit_told(status: int) -> NoReturn:
    """``os._exit`` in an actor: the status of a job that ends its process goes to
    the client's inbox first (all Ray says is that the actor's socket closed)."""
    job = _CURRENT
    if job.key and os.getpid() == job.pid and _THREADS.of_this_job():
        with contextlib.suppress(Exception):  # the process ends whatever happens
            item = (job.token, job.key, job.attempt, job.sent, "exited", int(status))
            ray = importlib.import_module("ray")
            ray.wait([job.inbox.put.remote(item)], timeout=EXIT_WAIT)
    _EXIT(status)


def _put(kind: str, value: Any) -> str:
    """Put a message of the running job in the inbox: "", or why it was not."""
    job = _CURRENT
    if job.inbox is None or not job.key:
        return "no job is running"
    if not _THREADS.of_this_job():
        return FROM_AN_ENDED_JOB
    try:
        job.inbox.put.remote((job.token, job.key, job.attempt, job.sent, kind, value))
    except Exception as exc:  # unpicklable value, inbox gone: the job goes on
        return f"{type(exc).__name__}: {exc}"
    job.sent += 1
    return ""


class JobActor:
    """One worker of a dispynb computation on Ray (made into an actor by the client).

    Parameters
    ----------
    inbox:
        The name of the engine's `Inbox` actor, which also holds the cluster's
        computation (``serialize.dumps`` of ``{"func", "setup", "cleanup",
        "setup_args", "names"}``, by value) and ``depends`` files (``{relative path:
        content}``) as refs to Ray objects the client owns, for the cluster's life.
        The actor gets them there as it starts and as Ray restarts it: none of its
        arguments is an object ref or an actor handle, for which Ray logs an error
        in each program (they might be gone when an actor restarts; ray-project/
        ray#53727).
    max_output:
        Characters of a job's stdout (and of its stderr) kept; None: all.
    token:
        The cluster's, in the messages its jobs put in the shared inbox.
    """

    def __init__(self, inbox: str, max_output: int | None, token: str) -> None:
        #: Jobs to skip when their call comes (`skip`), jobs begun: ``(key, attempt)``.
        self.skips: set[tuple[int, int]] = set()
        self.begun: collections.deque[tuple[int, int]] = collections.deque(maxlen=BEGUN)
        self.skips_lock = threading.Lock()
        #: Why the computation could not be set up here (`ready` says it), if so:
        #: not raised, since Ray's text of a constructor's error splices its own
        #: lines into a message of several lines, and drops the exception.
        self.failure: tuple[str, str] | None = None
        try:
            self._start(inbox, max_output, token)
        except SetupFailed as exc:
            self.failure = (str(exc), exc.remote_traceback)

    def _start(self, inbox: str, max_output: int | None, token: str) -> None:
        """Get the computation from the inbox, make the actor's directory, set up."""
        ray = importlib.import_module("ray")
        try:
            handle = ray.get_actor(inbox)
            _tell_earlier_lives(ray, handle, token)
            stored = ray.get(handle.computation.remote(token))
            if stored is None:
                raise LookupError(f"its cluster closed, or sent none in {KEEP_WAIT} s")
            bundle, files = ray.get(stored)
        except Exception as exc:
            raise SetupFailed(
                f"cannot get the computation from the client's Ray inbox: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.path = _actor_directory(ray)
        try:
            self._set_up(bundle, files, max_output, handle, token)
        except BaseException:
            os.chdir(tempfile.gettempdir())
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        # Set up: from now on, how this process ends is told by its next life.
        self.life = open(os.path.join(self.path, LIFE), "w")  # noqa: SIM115
        self.life.write(f"{os.getpid()}\n")
        self.life.flush()
        faulthandler.enable(file=self.life, all_threads=False)

    def _set_up(
        self,
        bundle: Any,
        files: dict[str, bytes],
        max_output: int | None,
        handle: Any,
        token: str,
    ) -> None:
        """Write the depends files, load the computation, run setup."""
        os.chdir(self.path)
        for relative, data in files.items():
            target = os.path.join(self.path, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as file:
                file.write(data)
        if self.path not in sys.path:
            sys.path.insert(0, self.path)  # depends' modules import from here
        try:
            loaded = serialize.loads(bundle)
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise SetupFailed(
                f"cannot load the computation in the Ray worker: "
                f"{type(cause).__name__}: {cause} (is a module it needs missing on "
                "the Ray cluster? install it there, or send it with depends)"
            ) from exc
        self.func: Callable[..., Any] = loaded["func"]
        self.cleanup_func: Callable[..., Any] | None = loaded.get("cleanup")
        self.setup_args = tuple(loaded.get("setup_args") or ())
        self.max_output = max_output
        _CURRENT.inbox, _CURRENT.token = handle, token
        _CURRENT.pid = os.getpid()
        os._exit = _exit_told
        names: dict[str, Any] = dict(loaded.get("names") or {})
        names.update(self._dispy_names())
        inject_names((self.func, loaded.get("setup"), self.cleanup_func), names)
        setup = loaded.get("setup")
        if setup is not None:
            _run_setup(setup, self.setup_args)

    def _dispy_names(self) -> dict[str, Any]:
        host = socket.gethostname()
        try:  # only ever in a Ray worker
            address = str(importlib.import_module("ray.util").get_node_ip_address())
        except Exception:
            address = "127.0.0.1"
        names: dict[str, Any] = {
            "dispy_node_name": host,
            "dispy_node_ip_addr": address,
            "dispy_job_path": self.path,
            "dispy_provisional_result": dispy_provisional_result,
            "dispy_send_file": dispy_send_file,
            "dispynode_logger": node_logger(),
            "dispynode_shutdown": refused_shutdown("a Ray worker"),
        }
        names.update(implicit_modules())
        return names

    def ready(self) -> tuple[int, str, str, tuple[str, str] | None]:
        """``(pid, host name, platform, failure)``: the actor is set up if
        ``failure`` is None, else it is ``(why, setup's traceback or "")``."""
        return os.getpid(), socket.gethostname(), platform.platform(), self.failure

    def skip(self, jobs: list[tuple[int, int]]) -> list[bool]:
        """Called in the `CONTROL` group while another job runs, for ``(key,
        attempt)`` jobs: for each, True if its call will not run it (it replies
        `SKIPPED` when its turn comes), False if it has begun already (it runs, or
        has run)."""
        answers = []
        with self.skips_lock:
            for key, attempt in jobs:
                begun = (key, attempt) in self.begun
                if not begun:
                    self.skips.add((key, attempt))
                answers.append(not begun)
        return answers

    def _begin(self, key: int, attempt: int) -> bool:
        """Whether job ``key`` runs now: False if it is to be skipped."""
        with self.skips_lock:
            if (key, attempt) in self.skips:
                self.skips.discard((key, attempt))
                return False
            self.begun.append((key, attempt))
            return True

    def run(
        self,
        head: int | tuple[Any, ...],
        *args: Any,
    ) -> tuple[str, Any, str, str, str | None, float, float, int]:
        """Run one job; ``(outcome, result, stdout, stderr, exception, start, end,
        number of messages it sent to the inbox)``; only `SKIPPED` (and empty
        values) if it was skipped (`skip`).

        ``head`` is the job's key (its first attempt, no keyword arguments, no
        memory limit), or ``(key, attempt, mem_limit, kwargs[, bytearrays[,
        places, named]])``: ``mem_limit`` is the bytes of address space the job
        may use (the soft ``RLIMIT_AS``, for this job only); ``bytearrays`` the
        positions
        of the arguments that were ``bytearray`` (Ray hands an argument of that
        type over as ``bytes``); ``places`` those of an executor's calls'
        ObjectRef arguments and ``named`` the keyword arguments that were
        ObjectRefs, whose objects Ray gave as the last ``args`` (`put_back`)."""
        kwargs: dict[str, Any]
        if isinstance(head, int):
            key, attempt, mem_limit, kwargs = head, 1, None, {}
        else:
            key, attempt, mem_limit, kwargs = head[:4]
            if len(head) > 5:
                args, kwargs = put_back(args, kwargs, head[5], head[6])
            if len(head) > 4:
                args = tuple(
                    bytearray(arg) if index in head[4] else arg
                    for index, arg in enumerate(args)
                )
        if not self._begin(key, attempt):
            return SKIPPED, None, "", "", None, 0.0, 0.0, 0
        limit = self.max_output
        out, err = CappedOutput("stdout", limit), CappedOutput("stderr", limit)
        _THREADS.begin()
        _STREAMS.begin(out, err)
        job = _CURRENT
        job.key, job.attempt, job.sent = key, attempt, 0
        result: Any = None
        exception: str | None = None
        outcome = RAISED
        lifted = limit_memory(mem_limit) if mem_limit is not None else None
        start = time.time()
        try:
            result = self.func(*args, **kwargs)
            outcome = FINISHED
        except BaseException as exc:  # reported to the client, never fatal
            exception = describe_failure(self.func, args, kwargs, exc, mem_limit)
        finally:
            end = time.time()
            if lifted is not None:
                resource.setrlimit(resource.RLIMIT_AS, lifted)
            _THREADS.end()
            _STREAMS.end()
            job.key = 0
            if os.getcwd() != self.path:
                os.chdir(self.path)  # the next job starts where every job does
        if outcome == FINISHED and type(result) not in _PLAIN:
            # Pickled here, where the result can be searched for what fails: Ray's
            # own error would come after the call, without the job's output.
            try:
                parts = serialize.dumps(result)
            except Exception as exc:
                exception = serialize.unpicklable_result(result, exc)
                outcome, result = RAISED, None
            else:
                outcome = PICKLED
                result = [parts[0], *map(pickle.PickleBuffer, parts[1:])]
        return (
            outcome,
            result,
            out.text(),
            err.text(),
            exception,
            start,
            end,
            job.sent,
        )

    def run_batch(
        self, items: list[tuple[tuple[int, int, int | None, dict[str, Any]], Any]]
    ) -> list[tuple[str, Any, str, str, str | None, float, float, int]]:
        """Run several short jobs, one after the other: ``(head, args)`` each (see
        `run`); their replies, in order. A result that cannot be pickled ends its
        own job (`run` checks it: the others' results still travel)."""
        return [self.run(head, *args) for head, args in items]

    def cleanup(self) -> str | None:
        """Run dispy's ``cleanup``; None, or the traceback of its failure."""
        error = None
        if self.cleanup_func is not None:
            try:
                self.cleanup_func(*self.setup_args)
            except BaseException:
                error = traceback.format_exc()
        os.chdir(tempfile.gettempdir())
        shutil.rmtree(self.path, ignore_errors=True)
        return error


def put_back(
    args: tuple[Any, ...], kwargs: dict[str, Any], places: list[Any], named: list[str]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A job's arguments from ``args``, whose last ones are the objects of its
    ObjectRef arguments Ray resolved (`_rayjobs._lift_refs`): those of an
    executor's calls put back in their ``places`` in the runner's ``key, blob,
    count, columns, kwargs``, then those of the job's keyword arguments
    ``named``."""
    objects = args[len(args) - len(places) - len(named) :]
    args = args[: len(args) - len(objects)]
    if named:
        kwargs = {**kwargs, **dict(zip(named, objects[len(places) :], strict=True))}
    if not places:
        return args, kwargs
    key, blob, count, columns, calls_kwargs = args
    columns = [list(column) for column in columns]
    calls_kwargs = dict(calls_kwargs or {})
    for place, value in zip(places, objects, strict=False):
        if isinstance(place, str):
            calls_kwargs[place] = value
        else:
            columns[place[0]][place[1]] = value
    return (key, blob, count, tuple(columns), calls_kwargs or None), kwargs


def load_result(reply: tuple[Any, ...]) -> tuple[Any, ...]:
    """``JobActor.run``'s reply with its result loaded, if it came `PICKLED` (on
    the client: a result that cannot be loaded here ends its job, saying why)."""
    if reply[0] != PICKLED:
        return reply
    try:
        result = serialize.loads(reply[1])
    except Exception as exc:  # SerializationError names the missing module or class
        why = f"the result cannot be unpickled here: {exc}\n"
        return (RAISED, None, *reply[2:4], why, *reply[5:])
    return (FINISHED, result, *reply[2:])


def earlier_lives(ray: Any) -> list[tuple[int, int, str]]:
    """How the earlier lives of this actor ended (its `LIFE` files, in the
    directories `_actor_directory` removes next): ``(pid, fatal signal number or 0,
    faulthandler's report)`` each."""
    prefix = _directory_prefix(ray)
    base = tempfile.gettempdir()
    lives = []
    with os.scandir(base) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            with contextlib.suppress(OSError, ValueError):
                path = os.path.join(entry.path, LIFE)
                if os.path.islink(path):
                    continue
                with open(path, errors="replace") as handle:
                    pid = int(handle.readline())
                    dump = handle.read()
                fatal = dump.partition("Fatal Python error: ")[2].partition("\n")[0]
                lives.append((pid, int(_FATAL.get(fatal.strip(), 0)), dump))
    return lives


def _tell_earlier_lives(ray: Any, inbox: Any, token: str) -> None:
    """Tell the client how this actor's earlier lives ended (`earlier_lives`)."""
    try:
        lives = earlier_lives(ray)
        node = ray.get_runtime_context().get_node_id()
        for pid, signum, dump in lives:
            inbox.put.remote((token, 0, 0, 0, LIFE, (node, pid, signum, dump)))
    except Exception as exc:  # the client then takes its node as lost
        logging.getLogger("dispynode").warning("earlier lives not told: %s", exc)


def _actor_directory(ray: Any) -> str:
    """A new directory for this actor's files (depends, what its jobs write).

    Ray restarts an actor killed under its job (Stop, ``job_timeout``) without
    running its cleanup: the directories of its earlier lives (named after the
    actor's id, which a restart keeps) are removed here, else each stopped job
    would leave one in the worker's temporary folder. Only directories of this
    user are removed, never through a symbolic link.
    """
    prefix = _directory_prefix(ray)
    base = tempfile.gettempdir()
    with os.scandir(base) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            with contextlib.suppress(OSError):
                if (
                    entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_uid == os.getuid()
                ):
                    shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def _directory_prefix(ray: Any) -> str:
    """The start of the names of this actor's directories (of each of its lives:
    a restart keeps the actor's id)."""
    return f"dispynb-ray-{ray.get_runtime_context().get_actor_id()}-"


def _run_setup(setup: Callable[..., Any], setup_args: tuple[Any, ...]) -> None:
    try:
        result = setup(*setup_args)
    except BaseException as exc:  # user code: any exit of setup is a failed setup
        # From setup's own frame on: the person's code, not this function.
        frames = exc.__traceback__.tb_next if exc.__traceback__ else None
        shown = "".join(traceback.format_exception(type(exc), exc, frames))
        raise SetupFailed(f"setup raised {type(exc).__name__}: {exc}", shown) from None
    failure = setup_failure(result)
    if failure is not None:
        raise SetupFailed(failure)
