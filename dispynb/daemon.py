"""What dispynb's daemons share on their command line: logging, exit codes and
their memory kept from their user's other processes.

``dispynb-node`` (`nodeserver.cli`) and ``dispynb-scheduler`` (`schedserver.cli`)
set their logging up alike and end alike: a setting that cannot work exits 2 and
any other dispynb error or a socket that cannot be opened exits 1, each with one
line on stderr naming the program. Both hold secrets while code of others runs as
their user (a node's jobs), so both make themselves non-dumpable (`set_dumpable`).
(The client library never imports the daemons; they import this.)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable

from dispynb.errors import ConfigurationError, DispynbError
from dispynb.startup import stop_signals

#: Log line layout of the daemons.
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

#: prctl(2) option (linux/prctl.h).
_PR_SET_DUMPABLE = 4


#: Log line layout when stderr is systemd's journal: it stamps the time itself.
JOURNAL_FORMAT = "%(name)s %(levelname)s %(message)s"

#: syslog priorities (sd-daemon(3) ``<N>`` line prefixes) of logging's levels.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4))


class JournalFormatter(logging.Formatter):
    """Lines that systemd's journal files at their level's priority: each line of
    a record (a traceback's too) begins with ``<N>`` (sd-daemon(3)), so that
    ``journalctl -p warning`` shows the warnings and errors, not every line at the
    default priority (info)."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """``record`` with its priority before each of its lines."""
        priority = next((p for lv, p in _PRIORITIES if record.levelno >= lv), None)
        if priority is None:
            priority = 6 if record.levelno >= logging.INFO else 7
        prefix = f"<{priority}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def to_journal() -> bool:
    """Whether stderr is systemd's journal: ``JOURNAL_STREAM`` (set by systemd for
    a service's output) names stderr's device and inode (systemd.exec(5); a child
    whose stderr was redirected elsewhere inherits the variable, not the match)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(2)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def log_formatter() -> logging.Formatter:
    """The daemons' formatter: `LOG_FORMAT`, or `JournalFormatter` under systemd."""
    return JournalFormatter() if to_journal() else logging.Formatter(LOG_FORMAT)


def setup_logging(debug: bool, level: str) -> None:
    """Log to stderr at ``level`` (``-d``: DEBUG), in `log_formatter`'s format."""
    handler = logging.StreamHandler()
    handler.setFormatter(log_formatter())
    logging.basicConfig(level=log_level(debug, level), handlers=[handler])


def setup_package_logging(package: str, level: str) -> None:
    """Log ``package``'s loggers to stderr at ``level`` in `setup_logging`'s
    format, and them only: the root logger stays unconfigured for the code this
    process and its children run (a job's ``logging.basicConfig()`` works, and its
    log lines go into its own output, not the daemon's)."""
    handler = logging.StreamHandler()  # this stderr, whatever a job makes its own
    handler.setFormatter(log_formatter())
    log = logging.getLogger(package)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def log_level(debug: bool, level: str) -> str:
    """The level name `setup_logging` logs at: what a daemon passes on to the
    processes it starts, so that they log as it does."""
    return "DEBUG" if debug else level.upper()


def run_daemon(prog: str, run: Callable[[], int]) -> int:
    """``run()``'s exit code, or the code and one stderr line for its error."""
    # An error under systemd: the journal files it as one (sd-daemon(3)).
    err = "<3>" if to_journal() else ""
    try:
        return run()
    except ConfigurationError as exc:
        print(f"{err}{prog}: {exc}", file=sys.stderr)
        return 2
    except DispynbError as exc:
        print(f"{err}{prog}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # Ours say what and how to fix it: no "[Errno 98]" before that.
        said = exc.strerror if exc.strerror and exc.filename is None else exc
        print(f"{err}{prog}: cannot start: {said}", file=sys.stderr)
        return 1


def set_dumpable(dumpable: bool) -> bool:
    """Whether the other processes of this user may read this process's memory
    and environment through /proc (``mem``, ``environ``, ``maps``, ``fd``...) or
    trace it (py-spy, gdb), and whether it dumps core (Linux's
    ``prctl(PR_SET_DUMPABLE)``). A daemon that holds a secret while code of others
    runs as its user (a node's jobs) sets False: a job could read the node secret
    from the node's memory. Root (``CAP_SYS_PTRACE``) still can. A fork inherits
    it, an exec sets True again. False where it cannot be set (not Linux)."""
    prctl = load_prctl()
    return prctl is not None and prctl(_PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) == 0


def load_prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux (``PR_SET_DUMPABLE``, and the node's
    ``PR_SET_PDEATHSIG``, ``PR_SET_CHILD_SUBREAPER``...); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    prctl.restype = ctypes.c_int
    return prctl


__all__ = [
    "JOURNAL_FORMAT",
    "LOG_FORMAT",
    "JournalFormatter",
    "load_prctl",
    "log_formatter",
    "log_level",
    "run_daemon",
    "set_dumpable",
    "setup_logging",
    "setup_package_logging",
    "stop_signals",
    "sync_dir",
    "to_journal",
]


def replace_file(path: str, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` at once (a new file, then renamed over it).

    The new file gets a name of its own (``O_EXCL``): one another user made first,
    or a symlink they planted, under a fixed name next to ``path`` (a port file in
    ``/tmp``) was written through, as the daemon's user (root: any file).

    It is on the disk before it replaces the old one, and its name after: a power
    loss leaves the old file or the new one, never an empty or torn one (a
    scheduler's users file, a node's saved configuration).
    """
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            os.fchmod(handle.fileno(), mode)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_dir(directory)


def sync_dir(path: str) -> None:
    """Put the names in directory ``path`` (a file renamed there) on the disk, where
    that can be done: a directory that cannot be read, or a file system that cannot
    sync one (EINVAL), is left as it is (the rename itself succeeded)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_own_file(path: str) -> int:
    """A read-only descriptor of ``path``, a regular file the daemon wrote in its
    own directory. Never through a symlink, and never a FIFO or a device: anything
    of the daemon's user (a node's jobs) can put one under that name, and opening
    a FIFO waits for a writer (a node reading its kept results, or starting, hung
    for ever). Raises OSError, saying what else the path is."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise OSError(f"{path} is {kind}, not a file this program wrote")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_own_file(path: str, limit: int) -> bytes:
    """The bytes of ``path`` (see `open_own_file`), which hold ``limit`` at most: a
    larger file raises OSError unread (a sparse file of terabytes put there was
    read whole into memory)."""
    fd = open_own_file(path)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path} holds over {limit} bytes: not a file this program wrote")
    return data
