"""What a job writes below Python: ``os.system``, a subprocess it does not capture, a
C or Fortran library's ``printf``. It goes to the worker's file descriptors 1 and 2,
not to ``sys.stdout``: it reached the node's own console (in a notebook using
``%dispy local``, whatever cell ran then, unlabelled), never ``job.stdout``.

A worker's descriptors 1 and 2 are two files of its own (`FdOutput`), and its own
Python streams and log handlers write to the node's descriptors instead
(`_OwnStreams`). What lands in the files joins the running job's captured
``stdout`` and ``stderr`` in its place among the job's Python prints (a print that
starts a line first takes in what the descriptor got since), and the rest when the
job returns; the files are then emptied. A job that printed nothing below Python
costs the worker three calls (``fflush``, two ``lseek``). The node server makes the
files and keeps them (`give_output_files`): a worker that dies leaves its job's
last words there, which the node puts in the job's report (`take_output_files`).
"""

from __future__ import annotations

import _thread
import codecs
import contextlib
import ctypes
import fcntl
import io
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from dispynb.errors import DispynbError
from nodeserver.ipc import OutputFiles

if TYPE_CHECKING:
    from nodeserver.compstate import Worker

logger = logging.getLogger(__name__)

#: Bytes read from a descriptor's file at a time.
_CHUNK = 1 << 16

#: Bytes of what a job whose worker died wrote below Python that its report keeps
#: (the last ones: a crash's last words).
CRASH_OUTPUT = 64 * 1024

#: Bytes a descriptor's file may hold before `_Spiller` takes them into the running
#: job's output (which keeps ``max_output`` and counts the rest) and frees them,
#: and seconds between its looks: a job printing without end below Python (``yes``,
#: a chatty solver) must not fill the node's disk until it returns.
SPILL_AT = 1 << 20
SPILL_EVERY = 0.25


def _load_fflush() -> Callable[[Any], int] | None:
    """libc's ``fflush``: C's stdout is fully buffered into a file, so a job's
    ``printf`` waits in it until flushed (into the next job's output, or never)."""
    try:
        fflush = ctypes.CDLL(None).fflush
    except (OSError, AttributeError):
        return None
    fflush.argtypes = [ctypes.c_void_p]
    fflush.restype = ctypes.c_int
    return fflush


def _load_punch_hole() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate``, to free a file's blocks already read (Linux)."""
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


#: Looked up once, in the node before it forks (as `_fflush`): in each worker the
#: look-up wrote to pages it shared with its parent.
_UTF8_DECODER = codecs.getincrementaldecoder("utf-8")

#: ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``.
_PUNCH_HOLE = 0x02 | 0x01
_punch_hole = _load_punch_hole()
_fflush = _load_fflush()


def _anonymous_file(directory: str) -> int:
    """A new file in ``directory``, unlinked (a job listing it sees none), opened
    O_APPEND: what the job's processes write once it was emptied goes at its start,
    not at the offset they last wrote at."""
    fd = _nameless_file(directory)
    fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)
    return fd


def _nameless_file(directory: str) -> int:
    """A new file in ``directory`` that never has a name there (``O_TMPFILE``): a
    job listing its directory while another worker starts sees no such file. Where
    the file system cannot, a named file unlinked at once."""
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            return os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            pass  # not supported there (EOPNOTSUPP, EISDIR on old kernels)
    fd, path = tempfile.mkstemp(prefix=".dispynb-output-", dir=directory)
    os.unlink(path)
    return fd


def give_output_files(worker: Worker, directory: str) -> None:
    """Send a new worker the files of its descriptors 1 and 2 (`OutputFiles`) and
    keep them (`take_output_files`); without them (no room in ``directory``) its
    jobs' output below Python goes to the node's own descriptors."""
    try:
        out = _anonymous_file(directory)
    except OSError as exc:
        logger.warning("job output below Python will not be captured: %s", exc)
        return
    try:
        err = _anonymous_file(directory)
    except OSError as exc:
        os.close(out)
        logger.warning("job output below Python will not be captured: %s", exc)
        return
    worker.output_fds = (out, err)
    with contextlib.suppress(DispynbError):  # a worker gone: lost with it
        worker.conn.write(OutputFiles(), (), (out, err))


def take_output_files(worker: Worker) -> tuple[str, str]:
    """The worker is lost: what its files hold (the last `CRASH_OUTPUT` bytes of
    each), what the job it ran wrote below Python (a C library's last words before
    a crash, which went to the node's console before); the files are closed."""
    fds, worker.output_fds = worker.output_fds, None
    if fds is None:
        return "", ""
    texts = []
    for fd in fds:
        text = ""
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - CRASH_OUTPUT)
            text = os.pread(fd, size - start, start).decode("utf-8", "replace")
            if start:
                text = (
                    f"[dispynb: the first {start} bytes written below Python "
                    f"dropped: the last {CRASH_OUTPUT} are kept]\n{text}"
                )
        except OSError:
            pass
        finally:
            os.close(fd)
        texts.append(text)
    return texts[0], texts[1]


class _Descriptor:
    """One of the worker's descriptors (1 or 2), pointed at its ``file`` (from the
    node: `give_output_files`) until `close`; ``taken`` bytes of that file are in
    the running job's output."""

    def __init__(self, fd: int, file: int) -> None:
        self.fd = fd
        self.file = file
        self.saved = os.dup(fd)  # the node's: the worker's own streams go there
        self.taken = 0
        self.decoder = _UTF8_DECODER("replace")
        #: Held while taking: threads of a job printing at once take it once.
        self.lock = threading.Lock()
        os.dup2(self.file, fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a job closed them (`FdOutput.lost`)
            os.dup2(self.saved, self.fd)
        for fd in (self.file, self.saved):
            with contextlib.suppress(OSError):
                os.close(fd)

    def size(self) -> int:
        """Bytes in the file (one system call)."""
        return os.lseek(self.file, 0, os.SEEK_END)

    def empty(self) -> None:
        os.ftruncate(self.file, 0)
        self.taken = 0
        self.decoder.reset()

    def take(self, capture: FdMerged) -> None:
        """Write what is pending into ``capture``, as text; once it is full (a
        `BoundedOutput` at its ``limit``), count the rest as dropped, unread."""
        with self.lock:
            self._take(capture)

    def _take(self, capture: FdMerged) -> None:
        size = self.size()
        limit: int | None = getattr(capture, "limit", None)
        while self.taken < size:
            want = min(size - self.taken, _CHUNK)
            if limit is not None:
                room = limit - capture.kept  # type: ignore[attr-defined]
                if room <= 0:
                    capture.dropped += size - self.taken  # type: ignore[attr-defined]
                    self.taken = size
                    return
                want = min(want, room * 4 + 4)  # room characters: 4 bytes or fewer
            data = os.pread(self.file, want, self.taken)
            if not data:
                return
            self.taken += len(data)
            capture.write_below(self.decoder.decode(data))

    def spill(self, output: FdOutput, index: int) -> None:
        """If the file holds over `SPILL_AT` bytes not taken: take them into the
        running job's capture (``output.captures[index]``, looked at under the
        lock: the job may have ended) and empty the file (O_APPEND: its writers go
        on at its start)."""
        if self.size() - self.taken <= SPILL_AT or _punch_hole is None:
            return
        with self.lock:
            captures = output.captures
            if captures is None:
                return
            self._take(captures[index])
            # Its blocks freed, offsets kept: a truncation would lose what the job's
            # processes append between the read and it.
            if _punch_hole(self.file, _PUNCH_HOLE, 0, self.taken) != 0:
                logger.debug("output below Python: no hole punched (%d)", self.file)

    def pass_on(self) -> None:
        """What came with no job running (a process a job left, before it was
        killed): to the node's descriptor, as it went before; then empty."""
        size = self.size()
        with contextlib.suppress(OSError):
            while self.taken < size:
                data = os.pread(self.file, min(size - self.taken, _CHUNK), self.taken)
                if not data:
                    break
                self.taken += len(data)
                os.write(self.saved, data)
        self.empty()


class FdOutput:
    """A worker's descriptors 1 and 2, each job's output (`begin`, `end`)."""

    def __init__(self, out: int, err: int) -> None:
        self.stdout = _Descriptor(1, out)
        try:
            self.stderr = _Descriptor(2, err)
        except OSError:
            self.stdout.close()
            raise
        self._fflush = _fflush
        self._own = _OwnStreams(self.stdout.saved, self.stderr.saved)
        #: The running job's captures (`begin` to `end`), for `_Spiller`.
        self.captures: tuple[FdMerged, FdMerged] | None = None
        #: Jobs begun so far: the `_Spiller` parks after a while with none.
        self.begun = 0
        #: Why the files are lost, if a job closed them (or the descriptors the
        #: worker kept of its own): the worker then captures no more (`end`).
        self.lost = ""
        self._spiller = _Spiller(self)

    @classmethod
    def adopt(cls, out: int, err: int) -> FdOutput | None:
        """The worker's descriptors pointed at the files ``out`` and ``err`` the
        node sent, or None (logged) if that fails: its jobs' output below Python
        then goes where it went."""
        _flush_streams()  # what the worker holds for the node's descriptors
        try:
            return cls(out, err)
        except OSError as exc:
            for fd in (out, err):
                with contextlib.suppress(OSError):  # closed already
                    os.close(fd)
            logger.warning("job output below Python will not be captured: %s", exc)
            return None

    def close(self) -> None:
        """Give the process its descriptors and streams back (a worker loop that
        ran in a process that goes on: the tests')."""
        self._spiller.stop()
        self._own.restore()
        if self._fflush is not None:
            self._fflush(None)
        self.stdout.close()
        self.stderr.close()

    def begin(self, out: FdMerged, err: FdMerged) -> None:
        """A job starts, writing into ``out`` and ``err``."""
        out.source, err.source = self.stdout, self.stderr
        self.captures = (out, err)
        self.begun += 1
        if self._spiller.parked:
            self._spiller.wake()

    def end(self, out: FdMerged, err: FdMerged) -> None:
        """The job returned: what its descriptors got since its last line joins
        ``out`` and ``err``."""
        self.captures = None
        if self._fflush is not None:
            self._fflush(None)  # C's stdout into a file is fully buffered
        try:
            for descriptor, capture in ((self.stdout, out), (self.stderr, err)):
                if descriptor.size() > descriptor.taken:
                    descriptor.take(capture)
                if descriptor.taken:
                    rest = descriptor.decoder.decode(b"", final=True)  # a cut one
                    if rest:
                        capture.write_below(rest)
                    descriptor.empty()
        except OSError as exc:
            # The job closed the files (``os.closerange``, a daemon's habits): it
            # killed its worker here, its output lost, said to be "exited with
            # status 1". Said in its stderr; the worker captures no more there.
            self.lost = exc.strerror or str(exc)
            err.write_below(
                f"\n[dispynb: the job closed its worker's files for output below "
                f"Python ({self.lost}): what it wrote there is lost, and its "
                "worker's next jobs write there to the node's own output]\n"
            )
        out.source = err.source = None

    def pass_on(self) -> None:
        """Between jobs, after processes a job left were killed: what they wrote
        since it returned goes to the node's descriptors, not the next job's."""
        self.stdout.pass_on()
        self.stderr.pass_on()


class _Spiller:
    """Looks at the running job's files every `SPILL_EVERY` s (`_Descriptor.spill`),
    so that what a job writes below Python without a Python print in between takes
    `SPILL_AT` bytes of disk at most, not all it writes until it returns.

    After a whole `SPILL_EVERY` in which no job began it parks (`parked`) until
    `FdOutput.begin` wakes it: an idle worker's thread does not wake at all, and one
    running jobs of microseconds wakes 1/`SPILL_EVERY` times a second, not per job
    (woken at each, it found the job ended and parked again).

    A bare ``_thread`` thread waiting on bare locks, not a `threading.Thread` with
    Events: a worker is forked, and the first `threading.Thread` it starts writes
    to about 80 pages (0.3 MiB) it shared with its parent (the threading module's
    state, Conditions, first runs of its code); this costs a quarter of that. Only
    the worker's own thread calls `wake` and `stop`, so each lock has one releaser.
    """

    def __init__(self, output: FdOutput) -> None:
        self._output = output
        # Each lock held means "not yet": released once by the worker's thread
        # (`_stopped`, `_wake`) or by this one (`_started`, `_ended`).
        self._stopped = _thread.allocate_lock()
        self._wake = _thread.allocate_lock()
        self._started = _thread.allocate_lock()
        self._ended = _thread.allocate_lock()
        for lock in (self._stopped, self._wake, self._started, self._ended):
            lock.acquire()
        #: Waiting for a job to begin (read by `FdOutput.begin`).
        self.parked = False
        #: The thread's id in the kernel (``/proc/self/task/<id>``).
        self.native_id = 0
        _thread.start_new_thread(self._run, ())
        self._started.acquire()  # native_id is set

    def _run(self) -> None:
        self.native_id = _thread.get_native_id()
        self._started.release()
        try:
            self._loop()
        finally:
            self._ended.release()

    def _loop(self) -> None:
        output = self._output
        seen = output.begun
        while not self._stopped.acquire(timeout=SPILL_EVERY):
            if output.captures is not None:
                with contextlib.suppress(OSError):  # closed as the worker ends
                    output.stdout.spill(output, 0)
                    output.stderr.spill(output, 1)
            elif output.begun == seen:
                # A wake-up left from before is dropped before parked is set, and
                # begun read again after: a job that begins in between sees parked,
                # or is seen here.
                self._wake.acquire(blocking=False)
                self.parked = True
                if output.begun == seen:
                    self._wake.acquire()
                self.parked = False
            seen = output.begun

    def wake(self) -> None:
        if self._wake.locked():
            self._wake.release()

    def stop(self) -> None:
        if self._stopped.locked():
            self._stopped.release()
        self.wake()
        self._ended.acquire()
        self._ended.release()


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):  # closed, say
            if stream is not None:
                stream.flush()


class _OwnStreams:
    """The worker's own Python streams (``sys.stdout``, ``sys.__stderr__``, ...) on
    descriptor 1 or 2, and the log handlers writing to them, moved to the saved
    descriptors: what the worker logs, and what a thread an earlier job left
    prints (`dispynb.jobenv.JobStream.own`), stays out of the running job's output."""

    def __init__(self, saved_out: int, saved_err: int) -> None:
        self._moved: dict[int, tuple[TextIO, TextIO]] = {}  # id(old): (old, new)
        self._names: list[tuple[str, TextIO]] = []
        for name in ("stdout", "__stdout__", "stderr", "__stderr__"):
            old = getattr(sys, name)
            new = self._move(old, {1: saved_out, 2: saved_err})
            if new is not None:
                self._names.append((name, old))
                setattr(sys, name, new)
        self._handlers: list[tuple[logging.StreamHandler[TextIO], TextIO]] = []
        for handler in _stream_handlers():
            moved = self._moved.get(id(handler.stream))
            if moved is not None:
                self._handlers.append((handler, moved[0]))
                handler.setStream(moved[1])

    def _move(self, old: TextIO | None, saved: dict[int, int]) -> TextIO | None:
        if old is None:
            return None
        if id(old) in self._moved:
            return self._moved[id(old)][1]
        try:
            fd = old.fileno()
        except (OSError, ValueError, AttributeError):  # no descriptor (a capture)
            return None
        if fd not in saved:
            return None
        with contextlib.suppress(Exception):
            old.flush()
        new = io.TextIOWrapper(
            io.FileIO(saved[fd], "w", closefd=False),
            encoding=getattr(old, "encoding", None) or "utf-8",
            errors=getattr(old, "errors", None) or "backslashreplace",
            line_buffering=True,
        )
        self._moved[id(old)] = (old, new)
        return new

    def restore(self) -> None:
        for handler, old in self._handlers:
            handler.setStream(old)
        for name, old in self._names:
            setattr(sys, name, old)
        for _old, new in self._moved.values():
            with contextlib.suppress(Exception):
                new.flush()


def _stream_handlers() -> list[logging.StreamHandler[TextIO]]:
    """The process's stream handlers (but `logging.lastResort`, which writes to
    whatever ``sys.stderr`` is), from the list logging keeps of every handler for
    its shutdown: a look at each logger's handlers wrote to every logger's page
    (reference counts), some 35 pages (0.14 MiB) each worker copied from the
    process it was forked from. Every logger's, where logging keeps no such list."""
    refs: list[Any] | None = getattr(logging, "_handlerList", None)
    if refs is None:
        loggers: list[logging.Logger] = [logging.getLogger()]
        loggers += [
            item
            for item in logging.Logger.manager.loggerDict.values()
            if isinstance(item, logging.Logger)
        ]
        found: list[Any] = [handler for log in loggers for handler in log.handlers]
    else:
        found = [ref() for ref in list(refs)]
    return [
        handler
        for handler in found
        if isinstance(handler, logging.StreamHandler)
        and handler is not logging.lastResort
    ]


class FdMerged:
    """Mixed into a job's ``sys.stdout``/``sys.stderr`` capture (a StringIO): a
    write that starts a line first takes in what the descriptor `source` got, so
    that output below Python keeps its place among the job's prints (a check, a
    system call, per line printed)."""

    source: _Descriptor | None = None
    _at_line_start = True

    def write(self, text: str) -> int:
        source = self.source
        if source is not None and self._at_line_start:
            try:
                if source.size() > source.taken:
                    source.take(self)
            except OSError:  # the job closed the file: `FdOutput.end` says so
                self.source = None
        if text:
            self._at_line_start = text[-1] == "\n"
        return super().write(text)  # type: ignore[misc, no-any-return]

    def write_below(self, text: str) -> int:
        """Write ``text`` that came from the descriptor."""
        return super().write(text)  # type: ignore[misc, no-any-return]
