"""Shared fixtures: unexpected ERROR log records fail a test; no leftover children,
threads or open file descriptors (sockets, pipes, files) after a test."""

from __future__ import annotations

import faulthandler
import gc
import glob
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from dispynb._live import EXIT_WAIT, live_clusters
from tests.ports import PortHolder, held_ports

#: Seconds a test's threads and descriptors get to go away after it (a thread that
#: is being joined, a socket closed by a callback still queued): a bounded wait for a
#: condition, never a sleep for correctness.
LEAK_GRACE = 5.0

#: Threads that may outlive a test because they are long-lived by design, by name
#: prefix, each with its reason. None so far: dispynb's I/O thread ("dispynb-io") is
#: reference-counted and stops with the last cluster, and the callback thread
#: ("dispynb-callbacks") with its cluster, so either one outliving a test is a
#: cluster left open; a module's shared cluster is made before the test and is not
#: counted.
ALLOWED_THREADS: tuple[str, ...] = ()


#: Seconds pytest's process may take to exit once its session is over (exit hooks:
#: a cluster still open waits for its jobs, as dispy's do). Past it, every thread's
#: stack is printed (under "Timeout") and the process ends with status 1: a hang at
#: exit is a failure shown, not a CI run that times out with nothing said.
EXIT_WATCHDOG = float(os.environ.get("DISPYNB_TEST_EXIT_WATCHDOG", "120"))


def _ignore_hangups_but_not_in_children(signum: int, frame: object) -> None:
    """pytest itself goes on after a hangup, as ``nohup`` asked."""


def pytest_configure(config: pytest.Config) -> None:
    # Under ``nohup ./dev test`` SIGHUP is ignored, and an ignored signal stays
    # ignored across exec: every node and scheduler the tests start would ignore
    # it too, as ``nohup dispynb-node`` rightly does, and the tests of a hangup
    # stopping them (started as a user types them, at a terminal) would fail. A
    # Python handler is reset to the default by exec: pytest still ignores hangups,
    # its children get the default disposition a terminal gives them.
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _ignore_hangups_but_not_in_children)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.dump_traceback_later(EXIT_WATCHDOG, exit=True, file=sys.__stderr__)


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def allow_error_logs() -> list[logging.LogRecord]:
    """Request this in a test that expects ERROR log records; returns them."""
    return _current.records if _current is not None else []


_current: _ErrorRecords | None = None


@pytest.fixture(autouse=True)
def _fail_on_error_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    global _current
    handler = _current = _ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        _current = None
    if "allow_error_logs" not in request.fixturenames and handler.records:
        lines = [f"{r.name}: {r.getMessage()}" for r in handler.records]
        pytest.fail("unexpected ERROR log records:\n" + "\n".join(lines))


@pytest.fixture(autouse=True)
def _no_leftover_children() -> Iterator[None]:
    """Every process a test starts (nodes, computations, workers) must be gone."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    left = [p for p in me.children(recursive=True) if p.pid not in before]
    if not left:
        return
    _gone, alive = psutil.wait_procs(left, timeout=10)
    names = []
    for proc in alive:
        try:
            names.append(f"{proc.pid} {' '.join(proc.cmdline()[:4])}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    if names:
        pytest.fail(f"processes left running after the test: {names}")


def _open_fds() -> dict[int, tuple[int, int]]:
    """This process's open descriptors: fd -> (device, inode) of what it refers to."""
    fds: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            st = os.fstat(fd)
        except OSError:
            continue  # the directory listing's own descriptor, closed already
        fds[fd] = (st.st_dev, st.st_ino)
    return fds


def _left_open(before: dict[int, tuple[int, int]], allow_engine: bool) -> list[str]:
    """The descriptors opened since ``before`` and open now, as ``"fd -> target"``;
    with ``allow_engine``, sockets and other anonymous ones (``...:[inode]``) are
    left out. One closed between the listing and the look at it is not open."""
    left = []
    for fd, ident in _open_fds().items():
        if before.get(fd) == ident:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (by a thread of an engine's client, say)
        if allow_engine and target.endswith("]"):
            continue
        left.append(f"{fd} -> {target}")
    return left


def fds_left_open(
    before: dict[int, tuple[int, int]], allow_engine: bool, deadline: float
) -> list[str]:
    """`_left_open` once the descriptors closing now had until ``deadline`` (a
    monotonic time) to go; the allowance applies at every look."""
    left = _left_open(before, allow_engine)
    if left:
        gc.collect()  # an unreachable socket is closed (with a ResourceWarning)
        left = _left_open(before, allow_engine)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition with a deadline
        left = _left_open(before, allow_engine)
    return left


@pytest.fixture
def held_port() -> Iterator[PortHolder]:
    """Call it for a port of 127.0.0.1 that no other test gets while this one
    runs, where nothing listens until a server of the test binds it
    (`tests.ports`); let go after the test."""
    with held_ports() as holder:
        yield holder


@pytest.fixture
def allow_engine_sockets() -> None:
    """Request it where a third-party engine's client (Ray's driver) keeps
    connections to the workers a test used, or closes them on its own threads, some
    after the test: sockets and other anonymous descriptors opened during the test
    are then not counted as leaks (at every look of the check)."""


@pytest.fixture(autouse=True)
def _no_leaked_threads_or_fds(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test must end the threads it started and close the descriptors it opened.

    Fixtures of a wider scope (a module's shared `LocalCluster`, a kernel) are set up
    before this one and torn down after it, so what they hold is not counted; a
    function-scoped fixture the test requests is torn down before this check.
    """
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    clusters_before = set(map(id, live_clusters()))
    yield
    problems = []
    # A cluster left open (a test that failed or timed out in its close) is
    # terminated here: it would wait for its jobs at pytest's exit, for ever if no
    # node is left, and its threads would count as the next tests' leaks.
    clusters = [c for c in live_clusters() if id(c) not in clusters_before]
    if clusters:
        problems.append(
            "clusters left open (terminated now): "
            + ", ".join(repr(c.name) for c in clusters)
        )
    for cluster in clusters:
        cluster._terminate(EXIT_WAIT)
    deadline = time.monotonic() + LEAK_GRACE

    def new_threads() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in threads_before
            and t.is_alive()
            and not t.name.startswith(ALLOWED_THREADS)
        ]

    threads = new_threads()
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    threads = new_threads()
    allow_engine = "allow_engine_sockets" in request.fixturenames
    fds = fds_left_open(fds_before, allow_engine, deadline)
    if threads:
        problems.append(
            "threads left running: " + ", ".join(repr(t.name) for t in threads)
        )
    if fds:
        problems.append("descriptors left open: " + ", ".join(fds))
    if problems:
        pytest.fail(f"{request.node.nodeid} leaks: " + "; ".join(problems))


@pytest.fixture(scope="module", autouse=True)
def _no_ipython_shell_outlives_its_module() -> Iterator[None]:
    """IPython's `InteractiveShell` is a process-wide singleton: a shell a module's
    tests made (and the ``sys.ps1``/``ps2`` prompts it sets) would make the modules
    after it look interactive, and their clusters behave as in a notebook (no default
    recovery file, for one)."""
    prompts = {name: getattr(sys, name, None) for name in ("ps1", "ps2")}
    yield
    shell_module = sys.modules.get("IPython.core.interactiveshell")
    if shell_module is not None and shell_module.InteractiveShell.initialized():
        shell_module.InteractiveShell.clear_instance()
    for name, value in prompts.items():
        if value is None and hasattr(sys, name):
            delattr(sys, name)


#: The pid in the name of a default recovery file (``-wal``/``-shm`` may follow).
_RECOVERY_PID = re.compile(r"_dispy_\d{14}_(\d+)")

#: This pytest run, in the environment of every process it starts (one whose parent
#: is gone included), unless a test gives one an environment of its own.
RUN_VARIABLE = "PYTEST_DISPYNB_RUN"
os.environ[RUN_VARIABLE] = f"{os.getpid()}-{time.time_ns()}"


def another_runs(path: str) -> bool:
    """Whether the recovery file ``path`` belongs to another pytest run in the same
    directory: the process named in it lives, is neither this one nor one it
    started, and has not this run's `RUN_VARIABLE`. One whose process is gone
    cannot be told apart: it counts as this run's (a leftover either way)."""
    found = _RECOVERY_PID.match(os.path.basename(path))
    if found is None or int(found.group(1)) == os.getpid():
        return False
    try:
        process = psutil.Process(int(found.group(1)))
        if any(ancestor.pid == os.getpid() for ancestor in process.parents()):
            return False
        return process.environ().get(RUN_VARIABLE) != os.environ[RUN_VARIABLE]
    except psutil.Error:  # gone, or its environment unreadable: no telling
        return False


@pytest.fixture(autouse=True)
def _no_recovery_file_left_in_the_cwd(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test must not leave dispy's default recovery file (``_dispy_<time>_<pid>``
    and its ``-shm``/``-wal``) in the current directory, the checkout: a client
    program started with no ``cwd`` that was killed, or a cluster of pytest's own
    process given node specs that did not close cleanly. Run such clients with their
    cwd in ``tmp_path``, or give the cluster a ``recover_file`` in ``tmp_path``.

    Another pytest run from the same checkout (its clusters make such files there
    all the time) is left alone: its files are neither counted nor removed
    (`another_runs`)."""
    cwd = os.getcwd()
    before = set(glob.glob(os.path.join(cwd, "_dispy_*")))
    yield
    new = set(glob.glob(os.path.join(cwd, "_dispy_*"))) - before
    left = sorted(path for path in new if not another_runs(path))
    for path in left:
        os.unlink(path)  # the checkout stays clean; the test fails, naming them
    if left:
        names = ", ".join(os.path.basename(path) for path in left)
        pytest.fail(f"{request.node.nodeid} left recovery files in {cwd}: {names}")
